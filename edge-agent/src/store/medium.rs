//! The storage seam: where segments live.
//!
//! A [`Medium`] holds numbered segments and small metadata blobs. Segments
//! are embedded-io byte streams (`Read + Write + Seek`), so the same store
//! runs on files on eMMC/SD ([`FsMedium`]), on a raw flash partition with a
//! small allocation table, or on [`super::sim::SimMedium`], which models what
//! a power cut does to unsynced writes.
//!
//! Contract (what the store relies on):
//! * `Write::flush` on a segment makes everything written to it durable
//!   (fdatasync for files), not merely leaves a buffer;
//! * `create` and `remove` are durable when they return (directory fsync);
//! * `write_meta` replaces a blob atomically and durably: after a power cut
//!   the old or the new contents are read back, never a mix.

use embedded_io::{ErrorType, Read, Seek, SeekFrom, Write};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

/// One segment's bytes.
pub trait SegmentIo: Read + Write + Seek {
    /// Cuts the segment to `len` bytes, durably (torn-tail repair).
    fn truncate(&mut self, len: u64) -> Result<(), Self::Error>;
    /// Current length in bytes.
    fn size(&mut self) -> Result<u64, Self::Error>;
}

pub trait Medium {
    type Error: embedded_io::Error + std::fmt::Display + Send + Sync + 'static;
    type Segment: SegmentIo + ErrorType<Error = Self::Error>;

    /// Ids of all segments, ascending.
    fn segments(&mut self) -> Result<Vec<u64>, Self::Error>;
    fn open(&mut self, id: u64) -> Result<Self::Segment, Self::Error>;
    /// A new, empty segment (replacing any with that id).
    fn create(&mut self, id: u64) -> Result<Self::Segment, Self::Error>;
    fn remove(&mut self, id: u64) -> Result<(), Self::Error>;
    /// Takes a segment out of the store but keeps its bytes for inspection.
    fn quarantine(&mut self, id: u64) -> Result<(), Self::Error>;
    fn read_meta(&mut self, name: &str) -> Result<Option<Vec<u8>>, Self::Error>;
    fn write_meta(&mut self, name: &str, bytes: &[u8]) -> Result<(), Self::Error>;
    /// Whether `e` means the medium has no space left.
    fn is_full(e: &Self::Error) -> bool {
        embedded_io::Error::kind(e) == embedded_io::ErrorKind::OutOfMemory
    }
    /// Free bytes left on the medium, if it can tell.
    fn free_bytes(&mut self) -> Option<u64> {
        None
    }
    /// Where it is, for messages.
    fn describe(&self) -> String;
}

/// Segments as files `seg-<id, 20 digits>.log` in one directory.
pub struct FsMedium {
    dir: PathBuf,
}

/// A segment file. `flush` is `fdatasync`.
pub struct FsSegment {
    file: File,
}

impl FsMedium {
    /// Uses `dir`, creating it if needed.
    pub fn new(dir: &Path) -> io::Result<FsMedium> {
        fs::create_dir_all(dir)?;
        Ok(FsMedium { dir: dir.to_owned() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("seg-{id:020}.log"))
    }
}

/// Replaces the file at `path` with `bytes` so that a power cut leaves the
/// old content or the new, never a mix: written to `<name>.tmp` beside it,
/// fsynced, renamed over `path`, and the directory fsynced. Every small
/// state file the agent keeps (the store's `acked`, the clock journal, the
/// model slots) is written this way.
pub fn replace_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write as _;
    let name = path.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let mut tmp_name = name.to_owned();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    sync_dir(path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")))
}

/// Makes renames and new entries in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Medium for FsMedium {
    type Error = io::Error;
    type Segment = FsSegment;

    fn segments(&mut self) -> io::Result<Vec<u64>> {
        let mut ids = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(id) = name.strip_prefix("seg-").and_then(|r| r.strip_suffix(".log")) {
                if let Ok(id) = id.parse() {
                    ids.push(id);
                }
            }
        }
        ids.sort_unstable();
        Ok(ids)
    }

    fn open(&mut self, id: u64) -> io::Result<FsSegment> {
        let file = OpenOptions::new().read(true).write(true).open(self.path(id))?;
        Ok(FsSegment { file })
    }

    fn create(&mut self, id: u64) -> io::Result<FsSegment> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(self.path(id))?;
        sync_dir(&self.dir)?;
        Ok(FsSegment { file })
    }

    fn remove(&mut self, id: u64) -> io::Result<()> {
        match fs::remove_file(self.path(id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        sync_dir(&self.dir)
    }

    fn quarantine(&mut self, id: u64) -> io::Result<()> {
        let from = self.path(id);
        let mut to = from.clone().into_os_string();
        to.push(".corrupt");
        fs::rename(&from, &to)?;
        sync_dir(&self.dir)
    }

    fn read_meta(&mut self, name: &str) -> io::Result<Option<Vec<u8>>> {
        match fs::read(self.dir.join(name)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn write_meta(&mut self, name: &str, bytes: &[u8]) -> io::Result<()> {
        replace_file(&self.dir.join(name), bytes)
    }

    fn is_full(e: &io::Error) -> bool {
        e.raw_os_error() == Some(libc::ENOSPC) || e.kind() == io::ErrorKind::StorageFull
    }

    fn free_bytes(&mut self) -> Option<u64> {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(self.dir.as_os_str().as_bytes()).ok()?;
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: valid C string and out-pointer.
        if unsafe { libc::statvfs(path.as_ptr(), &mut s) } != 0 {
            return None;
        }
        Some(s.f_bavail as u64 * s.f_frsize as u64)
    }

    fn describe(&self) -> String {
        self.dir.display().to_string()
    }
}

impl ErrorType for FsSegment {
    type Error = io::Error;
}

impl Read for FsSegment {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        io::Read::read(&mut self.file, buf)
    }
}

impl Write for FsSegment {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        io::Write::write(&mut self.file, buf)
    }

    /// Durable: fdatasync.
    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}

impl Seek for FsSegment {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        io::Seek::seek(&mut self.file, pos.into())
    }
}

impl SegmentIo for FsSegment {
    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)?;
        self.file.sync_all()
    }

    fn size(&mut self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
}
