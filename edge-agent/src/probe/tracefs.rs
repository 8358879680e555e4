//! tracefs: where it is, mounting it when missing, and reading tracepoint
//! record layouts from `events/<group>/<event>/format`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    #[error("tracefs is not mounted and mounting it at /sys/kernel/tracing failed: {0} (mount it with `mount -t tracefs tracefs /sys/kernel/tracing`, or run the agent with CAP_SYS_ADMIN)")]
    Mount(std::io::Error),
    #[error("tracepoint {0} does not exist on this kernel ({1} missing)")]
    NoTracepoint(String, PathBuf),
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("format of tracepoint {event}: {message}")]
    Format { event: String, message: String },
}

/// One field of a tracepoint record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    pub offset: u32,
    pub size: u32,
    pub signed: bool,
}

/// Field name -> layout, from a tracefs format file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    fields: HashMap<String, Field>,
}

impl Layout {
    /// Parses the text of a tracefs `format` file. Lines look like
    /// `\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;`.
    pub fn parse(text: &str) -> Layout {
        let mut fields = HashMap::new();
        for line in text.lines() {
            let mut decl = None;
            let (mut offset, mut size, mut signed) = (None, None, None);
            for part in line.split(';') {
                let part = part.trim();
                if let Some(d) = part.strip_prefix("field:") {
                    decl = Some(d.trim());
                } else if let Some(v) = part.strip_prefix("offset:") {
                    offset = v.trim().parse().ok();
                } else if let Some(v) = part.strip_prefix("size:") {
                    size = v.trim().parse().ok();
                } else if let Some(v) = part.strip_prefix("signed:") {
                    signed = v.trim().parse::<u8>().ok();
                }
            }
            let (Some(decl), Some(offset), Some(size)) = (decl, offset, size) else {
                continue;
            };
            // The name is the last word of the declaration, less any array suffix.
            let Some(name) =
                decl.rsplit(|c: char| c.is_whitespace() || c == '*').next().map(|n| n.split('[').next().unwrap_or(n))
            else {
                continue;
            };
            fields.insert(name.to_owned(), Field { offset, size, signed: signed.unwrap_or(0) != 0 });
        }
        Layout { fields }
    }

    pub fn field(&self, name: &str) -> Option<Field> {
        self.fields.get(name).copied()
    }
}

/// The tracefs mount point, mounting tracefs at /sys/kernel/tracing when no
/// mount exists and we have the right to.
pub fn ensure_mounted() -> Result<PathBuf, TracefsError> {
    for p in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        if Path::new(p).join("events").is_dir() {
            return Ok(PathBuf::from(p));
        }
    }
    let target = c"/sys/kernel/tracing";
    let fstype = c"tracefs";
    // SAFETY: all pointers are valid NUL-terminated strings; data may be null.
    let rc = unsafe { libc::mount(fstype.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(TracefsError::Mount(std::io::Error::last_os_error()));
    }
    tracing::info!("mounted tracefs at /sys/kernel/tracing");
    Ok(PathBuf::from("/sys/kernel/tracing"))
}

/// Reads the record layout of `group:event`.
pub fn layout(root: &Path, group: &str, event: &str) -> Result<Layout, TracefsError> {
    let dir = root.join("events").join(group).join(event);
    let path = dir.join("format");
    if !dir.is_dir() {
        return Err(TracefsError::NoTracepoint(format!("{group}:{event}"), dir));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| TracefsError::Read(path, e))?;
    Ok(Layout::parse(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Verbatim from a 6.x x86_64 kernel.
    const SET_STATE_6X: &str = "name: inet_sock_set_state
ID: 2287
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:36;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:56;\tsize:16;\tsigned:0;

print fmt: \"family=%s ...\"
";

    #[test]
    fn parses_a_6x_layout() {
        let l = Layout::parse(SET_STATE_6X);
        assert_eq!(l.field("skaddr"), Some(Field { offset: 8, size: 8, signed: false }));
        assert_eq!(l.field("oldstate"), Some(Field { offset: 16, size: 4, signed: true }));
        assert_eq!(l.field("protocol"), Some(Field { offset: 30, size: 2, signed: false }));
        assert_eq!(l.field("daddr_v6"), Some(Field { offset: 56, size: 16, signed: false }));
        assert_eq!(l.field("common_pid").map(|f| f.offset), Some(4));
        assert_eq!(l.field("print"), None);
    }

    #[test]
    fn parses_a_preempt_rt_style_shift_and_u8_protocol() {
        // PREEMPT_RT adds header fields; before 5.6 protocol was a u8.
        let text = SET_STATE_6X
            .replace("offset:8;", "offset:16;")
            .replace("__u16 protocol;\toffset:30;\tsize:2", "__u8 protocol;\toffset:38;\tsize:1");
        let l = Layout::parse(&text);
        assert_eq!(l.field("skaddr").map(|f| f.offset), Some(16));
        assert_eq!(l.field("protocol"), Some(Field { offset: 38, size: 1, signed: false }));
    }
}
