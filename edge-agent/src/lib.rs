//! edge-agent: probe -> window -> detect -> store -> uplink.
//!
//! Each stage owns its state and hands values forward:
//! * [`probe`]: kernel programs and their in-kernel aggregates;
//! * [`window`]: one reading per window becomes one batch of samples;
//! * [`detect`]: the window's features scored by the anomaly model; alarms;
//! * [`store`]: the batch, encoded once, becomes a durable record;
//! * [`uplink`]: records go to MQTT; acknowledgements move the send position.

pub mod audit;
pub mod clock;
pub mod config;
pub mod detect;
pub mod features;
pub mod metrics;
pub mod privileges;
pub mod probe;
pub mod probe_programs;
pub mod remote;
pub mod store;
pub mod uplink;
pub mod values;
pub mod window;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use config::Config;
use metrics::AgentMetrics;
use probe::Probes;
use store::recorder::Recorder;
use store::Lanes;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(
        "cannot listen for /metrics on {addr}: {source} (set metrics.listen to a free address, or \"\" to disable)"
    )]
    Metrics { addr: String, source: std::io::Error },
    #[error("cannot start: {0}")]
    Start(#[from] std::io::Error),
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Runs the agent until SIGTERM or SIGINT. SIGHUP reads `config_path`
/// again and applies what can change at run time: the probes (enabled,
/// disabled, port classes), detached and freed before the new ones attach.
pub fn run(mut cfg: Config, config_path: Option<std::path::PathBuf>) -> Result<(), RunError> {
    // Handlers first: until they are installed a SIGHUP (a reload sent as
    // soon as /metrics answers, say) would kill the agent by default action.
    let signals = async_signal::Signals::new([async_signal::Signal::Term, async_signal::Signal::Int])?;
    let hup = match async_signal::Signals::new([async_signal::Signal::Hup]) {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler: config reloads need a restart");
            None
        }
    };
    if cfg.mqtt.tls.plain_to_remote(&cfg.mqtt.host) {
        tracing::warn!(
            host = %cfg.mqtt.host,
            "mqtt.tls.enabled = false: plain TCP to a broker that is not on this machine; the password and \
             every window cross the network in clear"
        );
    }
    let (metrics, registry) = AgentMetrics::new();
    let store = Lanes::open(&cfg.store_dir(), cfg.store_limits(), cfg.priority_limits())?;
    metrics.observe_lanes(&store);
    tracing::info!(
        dir = %cfg.store_dir().display(),
        backlog = store.routine.stats().backlog(),
        priority_backlog = store.priority.stats().backlog(),
        "store opened"
    );
    let store = Arc::new(Mutex::new(store));
    let (clock, clock_err) = clock::Clock::open(&cfg.state_dir, cfg.clock.tolerance_ms as i64);
    if let Some(e) = clock_err {
        tracing::error!(error = %e, "clock journal damaged: blocks of its eras go as stamped");
    }
    let clock = Arc::new(Mutex::new(clock));

    // Bound before the probes load (which takes a while): a taken address
    // fails the start at once, with nothing attached yet.
    let listener = if cfg.metrics.listen.is_empty() {
        None
    } else {
        let bound = std::net::TcpListener::bind(cfg.metrics.listen.as_str())
            .map_err(|source| RunError::Metrics { addr: cfg.metrics.listen.clone(), source })?;
        Some(bound)
    };

    // The clock's era first: the start's audit records are stamped in it
    // (a record before the run's first era would be corrected by the
    // last run's).
    let (clocks, era) = clock_era(&store, &clock, cfg.clock.test_offset_ms);
    let audit =
        audit::Audit::open(&cfg.state_dir, store.clone(), metrics.audit_records.clone(), cfg.clock.test_offset_ms);
    let previous_run = audit.start_run();
    // Remote configuration: the applied documents over the local file.
    let remote = match (&config_path, cfg.remote_config.enabled) {
        (Some(path), true) => {
            match remote::Remote::open(&cfg, path.clone(), audit.clone(), metrics.remote_configs.clone()) {
                Ok(r) => {
                    match r.effective() {
                        Ok(c) => cfg = c,
                        Err(e) => tracing::error!(error = %e, "remote config: running the configuration given"),
                    }
                    Some(r)
                }
                Err(e) => {
                    tracing::error!(error = %e, "remote config off: the stage cannot start");
                    None
                }
            }
        }
        (None, true) => {
            tracing::error!("remote_config.enabled needs a config file (--config): the documents' floor");
            None
        }
        _ => None,
    };

    // An installed probe program pack is in force before the probes start.
    let programs = probe_programs::Programs::open(
        &cfg.probe_programs,
        &cfg.state_dir,
        metrics.probe_programs.clone(),
        audit.clone(),
    );
    let probes = Probes::start(&cfg);
    metrics.probes.set_states(&probes);
    let mut privileges_fields = Vec::new();
    match privileges::drop_root(&cfg.run_as, &cfg.state_dir) {
        Ok(privileges::Outcome::Dropped { user, uid, caps, .. }) => {
            tracing::info!(user, uid, capabilities = ?caps, "probes loaded: no longer root");
            privileges_fields =
                vec![("user", user.to_string()), ("uid", uid.to_string()), ("capabilities", format!("{caps:?}"))];
        }
        Ok(privileges::Outcome::Disabled) => tracing::info!("running as root (run_as = \"\")"),
        Ok(privileges::Outcome::NotRoot) => {}
        Err(e) => {
            tracing::warn!(error = %e, "still running as root");
            privileges_fields = vec![("error", e.to_string())];
        }
    }

    let uplink_parts = UplinkParts {
        store: store.clone(),
        clock: clock.clone(),
        metrics: metrics.clone(),
        audit: audit.clone(),
        configs: remote.as_ref().map(remote::Remote::inbox),
        // Packs are listened for only while a key says whose to take.
        programs: (!cfg.probe_programs.public_key_file.as_os_str().is_empty()).then(|| programs.inbox()),
        shutdown: Arc::new(AtomicBool::new(false)),
    };
    let uplink = Arc::new(Mutex::new(uplink_parts.spawn(&cfg)?));
    let tags = cfg.tag_map().unwrap_or_default();
    let tag_names = tags.tags.iter().map(|t| t.name.clone()).collect();
    let mut detect = detect::DetectStage::new(&cfg.detect, &cfg.state_dir, cfg.window(), &cfg.device_id, tag_names);
    detect.action.counts = metrics.detect.action_counts();
    detect.set_audit(audit.clone());
    audit.record(
        "agent_started",
        &[
            ("version", env!("CARGO_PKG_VERSION").to_owned()),
            ("previous_run", previous_run.to_owned()),
            ("model_sha256", detect.model_sha256().unwrap_or("-").to_owned()),
        ],
    );
    audit.config_applied(config_source(config_path.as_deref()), "start");
    if !privileges_fields.is_empty() {
        let event = if privileges_fields[0].0 == "error" { "privileges_kept" } else { "privileges_dropped" };
        audit.record(event, &privileges_fields);
    }
    audit.record("probes_changed", &probe_fields(&probes));
    if era.new {
        audit_era(&audit, &clocks, &era);
    }
    let probes = std::cell::RefCell::new(probes);
    metrics.detect.set_model_state(&detect);
    let detect = std::cell::RefCell::new(detect);
    if !tags.is_empty() {
        tracing::info!(tags = tags.tags.len(), "tag map: process values are captured");
    }
    let values = values::ValuesStage::new(tags);
    metrics.observe_values(&values);
    let values = std::cell::RefCell::new(values);
    let sh = Shared {
        values: &values,
        detect: &detect,
        probes: &probes,
        store: &store,
        metrics: &metrics,
        clock: &clock,
        audit: &audit,
        test_offset_ms: cfg.clock.test_offset_ms,
        uplink: &uplink,
        uplink_parts: &uplink_parts,
        remote_on: remote.is_some(),
        programs: &programs,
        programs_on: !cfg.probe_programs.public_key_file.as_os_str().is_empty(),
    };
    let remote = std::cell::RefCell::new(remote);

    let result = smol::block_on(async {
        if let Some(listener) = listener {
            tracing::info!(addr = %cfg.metrics.listen, "serving /metrics");
            let serve = move || edge_wire::exposition::serve(listener, registry);
            std::thread::Builder::new()
                .name("metrics".into())
                .stack_size(128 * 1024)
                .spawn(serve)
                .map_err(|source| RunError::Metrics { addr: cfg.metrics.listen.clone(), source })?;
        }
        let windows = window_loop(&cfg, config_path.as_deref(), &sh, hup, &remote);
        let stop = async {
            use futures_lite::StreamExt;
            let mut signals = signals;
            let sig = signals.next().await;
            tracing::info!(signal = ?sig, "shutting down");
            audit.record("agent_stopped", &[("signal", format!("{sig:?}"))]);
        };
        futures_lite::future::or(windows, stop).await;
        Ok::<(), RunError>(())
    });

    // Store what the probes counted since the last window, then let the
    // uplink persist its position and disconnect.
    let mut recorder = Recorder::new(cfg.block_writer());
    close_window(&sh, &mut window::WindowStage::new(), &mut recorder);
    uplink_parts.shutdown.store(true, Ordering::Relaxed);
    uplink::lock(&uplink).stop();
    audit.end_run();
    result
}

/// What the window loop works with.
struct Shared<'a> {
    values: &'a std::cell::RefCell<values::ValuesStage>,
    detect: &'a std::cell::RefCell<detect::DetectStage>,
    /// Replaced on SIGHUP (the window loop is the only user).
    probes: &'a std::cell::RefCell<Probes>,
    store: &'a Arc<Mutex<Lanes>>,
    metrics: &'a AgentMetrics,
    clock: &'a Mutex<clock::Clock>,
    audit: &'a audit::Audit,
    test_offset_ms: i64,
    /// The uplink's thread, started anew when `[mqtt]` changes.
    uplink: &'a Arc<Mutex<UplinkThread>>,
    uplink_parts: &'a UplinkParts,
    /// Remote configuration is on: its counts travel in the windows.
    remote_on: bool,
    /// Probe program packs (a key is set: their counts travel in the
    /// windows).
    programs: &'a probe_programs::Programs,
    programs_on: bool,
}

/// What an uplink thread is made of, besides its configuration.
struct UplinkParts {
    store: Arc<Mutex<Lanes>>,
    clock: Arc<Mutex<clock::Clock>>,
    metrics: AgentMetrics,
    audit: Arc<audit::Audit>,
    configs: Option<remote::Inbox>,
    programs: Option<probe_programs::Inbox>,
    /// The agent is stopping: no uplink starts any more.
    shutdown: Arc<AtomicBool>,
}

/// A running uplink thread and its own stop flag.
struct UplinkThread {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl UplinkThread {
    /// Ends the thread (its positions persisted) and waits for it.
    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl UplinkParts {
    fn spawn(&self, cfg: &Config) -> std::io::Result<UplinkThread> {
        let stop = Arc::new(AtomicBool::new(false));
        let handle = uplink::Uplink::new(
            cfg.clone(),
            self.store.clone(),
            self.clock.clone(),
            self.metrics.clone(),
            stop.clone(),
        )
        .with_models(detect::update::Inbox::of(&cfg.detect, &cfg.state_dir))
        .with_configs(self.configs.clone())
        .with_programs(self.programs.clone())
        .with_audit(self.audit.clone())
        .spawn()?;
        Ok(UplinkThread { stop, handle: Some(handle) })
    }

    /// The uplink anew with `cfg`'s `[mqtt]`: the running one ends first
    /// (a helper thread waits for it, so the windows go on), then the new
    /// one starts from the persisted positions.
    fn restart(&self, slot: &Arc<Mutex<UplinkThread>>, cfg: &Config) {
        let old = {
            let mut t = uplink::lock(slot);
            t.stop.store(true, Ordering::Relaxed);
            UplinkThread { stop: t.stop.clone(), handle: t.handle.take() }
        };
        let (slot, cfg) = (slot.clone(), cfg.clone());
        let parts = UplinkParts {
            store: self.store.clone(),
            clock: self.clock.clone(),
            metrics: self.metrics.clone(),
            audit: self.audit.clone(),
            configs: self.configs.clone(),
            programs: self.programs.clone(),
            shutdown: self.shutdown.clone(),
        };
        let spawned = std::thread::Builder::new().name("uplink-restart".into()).spawn(move || {
            let mut old = old;
            old.stop();
            let mut t = uplink::lock(&slot);
            if parts.shutdown.load(Ordering::Relaxed) {
                return;
            }
            match parts.spawn(&cfg) {
                Ok(new) => {
                    *t = new;
                    tracing::info!(host = %cfg.mqtt.host, port = cfg.mqtt.port, "uplink restarted with new [mqtt] settings");
                }
                Err(e) => tracing::error!(error = %e, "the uplink could not start again"),
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "the uplink could not be restarted");
        }
    }
}

/// What a config file is, for the audit trail: its SHA-256, or "defaults".
fn config_source(path: Option<&std::path::Path>) -> String {
    match path.map(std::fs::read) {
        None => "defaults".into(),
        Some(Ok(bytes)) => audit::sha256_hex(&bytes),
        Some(Err(e)) => format!("unreadable: {e}"),
    }
}

/// The probes' states as audit fields (`<probe> = <state>`).
fn probe_fields(probes: &Probes) -> Vec<(&'static str, String)> {
    probes.states.iter().map(|(name, state)| (*name, format!("{state:?}"))).collect()
}

async fn window_loop(
    cfg: &Config,
    config_path: Option<&std::path::Path>,
    sh: &Shared<'_>,
    mut hup: Option<async_signal::Signals>,
    remote: &std::cell::RefCell<Option<remote::Remote>>,
) {
    use futures_lite::StreamExt;
    let mut stage = window::WindowStage::new();
    let mut recorder = Recorder::new(cfg.block_writer());
    let period = cfg.window();
    let mut next = Instant::now() + period;
    // What runs: the file (and the remote layers) as last applied.
    let mut running = cfg.clone();
    // Readable when the protocol probe has value events waiting, or the
    // device probe serial bytes.
    let watch_values = || {
        let p = sh.probes.borrow();
        let tcp = p.protocols.as_ref().and_then(|p| p.values_fd()).and_then(|fd| smol::Async::new(fd).ok());
        let rtu = p.devices.as_ref().and_then(|d| d.bytes_fd()).and_then(|fd| smol::Async::new(fd).ok());
        (tcp, rtu)
    };
    let mut values_ready = watch_values();
    loop {
        #[derive(PartialEq)]
        enum Wake {
            Tick,
            Reload,
            Values,
        }
        let tick = async {
            smol::Timer::at(next).await;
            Wake::Tick
        };
        let reload = async {
            match hup.as_mut() {
                Some(h) => match h.next().await {
                    Some(_) => Wake::Reload,
                    None => Wake::Tick,
                },
                None => std::future::pending().await,
            }
        };
        let values = async {
            futures_lite::future::or(readable(values_ready.0.as_ref()), readable(values_ready.1.as_ref())).await;
            Wake::Values
        };
        let wake = futures_lite::future::or(futures_lite::future::or(tick, reload), values).await;
        if wake == Wake::Values {
            drain_values(sh);
            continue;
        }
        let new = if wake == Wake::Reload {
            reload_config(config_path, sh, remote.borrow().as_ref())
        } else {
            next += period;
            // After a long stall (suspend, overload) skip missed windows
            // rather than firing a burst of them.
            if next < Instant::now() {
                next = Instant::now() + period;
            }
            close_window(sh, &mut stage, &mut recorder);
            // A probe program pack: the probes start again with it.
            let restarted = std::cell::Cell::new(false);
            sh.programs.poll(|| {
                if !restarted.replace(true) {
                    drop(std::mem::take(&mut values_ready));
                }
                restart_probes(sh, &running)
            });
            if restarted.get() {
                values_ready = watch_values();
            }
            remote.borrow_mut().as_mut().and_then(|r| poll_remote(r, sh))
        };
        if let Some(new) = new {
            if new.probes != running.probes {
                // Count what the old probes saw into a window first.
                close_window(sh, &mut stage, &mut recorder);
                // The old rings' descriptors go with the old probes.
                drop(std::mem::take(&mut values_ready));
            }
            apply_config(&mut running, new, sh);
            values_ready = watch_values();
        }
    }
}

/// SIGHUP: the config file read again (with the remote layers over it).
/// A bad file changes nothing, said and audited.
fn reload_config(path: Option<&std::path::Path>, sh: &Shared<'_>, remote: Option<&remote::Remote>) -> Option<Config> {
    let Some(path) = path else {
        tracing::warn!("SIGHUP: the agent runs on its defaults (no --config): nothing to reload");
        return None;
    };
    let loaded = match remote {
        Some(r) => r.effective(),
        None => Config::load(Some(path)).map_err(|e| e.to_string()),
    };
    match loaded {
        Ok(c) => {
            sh.audit.config_applied(config_source(Some(path)), "sighup");
            Some(c)
        }
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: config not reloaded; the agent keeps its current settings");
            sh.audit.record("config_refused", &[("sha256", config_source(Some(path))), ("error", e)]);
            None
        }
    }
}

/// The remote configuration stage's look at this window: its decision,
/// and the configuration to apply if any.
fn poll_remote(r: &mut remote::Remote, sh: &Shared<'_>) -> Option<Config> {
    let (confirmed, next_seq) = {
        let lanes = uplink::lock(sh.store);
        (lanes.routine.stats().acked_seq, lanes.routine.next_seq())
    };
    match r.poll(now_ms(), confirmed, next_seq) {
        remote::Step::Apply(c) | remote::Step::Revert(c) => Some(*c),
        remote::Step::Kept | remote::Step::Idle => None,
    }
}

/// A new configuration, applied where it can be at run time: new probe
/// settings replace the probes (old programs and maps detached and freed
/// first), new `[mqtt]` settings restart the uplink; other sections need a
/// restart and say so.
fn apply_config(running: &mut Config, new: Config, sh: &Shared<'_>) {
    let mut others = Vec::new();
    if new.store != running.store {
        others.push("store");
    }
    if new.window.millis != running.window.millis || new.device_id != running.device_id {
        others.push("window/device_id");
    }
    if new.detect != running.detect || new.remote_config != running.remote_config {
        others.push("detect/remote_config");
    }
    if !others.is_empty() {
        tracing::warn!(sections = ?others, "these settings changed and apply only after a restart");
    }
    if new.mqtt != running.mqtt {
        sh.uplink_parts.restart(sh.uplink, &new);
        running.mqtt = new.mqtt.clone();
    }
    if new.probes == running.probes {
        tracing::info!("probe settings unchanged");
        return;
    }
    let mut probes = sh.probes.borrow_mut();
    // Detach and free the old programs and maps before attaching anew.
    *probes = Probes::none();
    *probes = Probes::start(&new);
    sh.metrics.probes.set_states(&probes);
    sh.audit.record("probes_changed", &probe_fields(&probes));
    running.probes = new.probes.clone();
    tracing::info!(probes = ?probes.states.iter().map(|(n, s)| format!("{n}: {s:?}")).collect::<Vec<_>>(), "probes reloaded");
}

/// The probes started again with the objects in force (a probe program
/// pack tried or put back): the probes attached before and not now.
fn restart_probes(sh: &Shared<'_>, cfg: &Config) -> Vec<String> {
    let mut probes = sh.probes.borrow_mut();
    let attached = |p: &Probes| -> Vec<String> {
        p.states.iter().filter(|(_, s)| matches!(s, probe::ProbeState::Attached)).map(|(n, _)| n.to_string()).collect()
    };
    let before = attached(&probes);
    // Detach and free the old programs and maps before attaching anew.
    *probes = Probes::none();
    *probes = Probes::start(cfg);
    sh.metrics.probes.set_states(&probes);
    sh.audit.record("probes_changed", &probe_fields(&probes));
    let now = attached(&probes);
    before.into_iter().filter(|n| !now.contains(n)).collect()
}

/// Returns when `fd` is readable; never without one.
async fn readable(fd: Option<&smol::Async<std::os::fd::OwnedFd>>) {
    match fd {
        Some(fd) => {
            let _ = fd.readable().await;
        }
        None => std::future::pending().await,
    }
}

/// The protocol probe's value events and the device probe's serial bytes
/// into the values stage.
fn drain_values(sh: &Shared<'_>) {
    let offset_ns = values::wall_minus_mono_ns() + sh.test_offset_ms * 1_000_000;
    let mut probes = sh.probes.borrow_mut();
    let mut stage = sh.values.borrow_mut();
    if let Some(p) = probes.protocols.as_mut() {
        p.drain_values(|ev| stage.tcp_event(ev, offset_ns));
    }
    if let Some(d) = probes.devices.as_mut() {
        d.drain_bytes(|ev| {
            let time_ms = (ev.ts_ns as i64).saturating_add(offset_ns).div_euclid(1_000_000);
            stage.serial_bytes(ev.device, ev.tgid, ev.written, ev.data, time_ms)
        });
    }
}

/// One window, stage after stage: the probes' reading, the clock's time,
/// the window's samples, the process values, the model's verdict, the
/// store. Each stage takes what the one before handed on and moves its own
/// metrics.
fn close_window(sh: &Shared<'_>, stage: &mut window::WindowStage, recorder: &mut Recorder) {
    drain_values(sh);
    let reading = read_probes(sh);
    let (clocks, era) = clock_era(sh.store, sh.clock, sh.test_offset_ms);
    if era.new {
        audit_era(sh.audit, &clocks, &era);
    }
    let ts = clocks.wall_ms;
    let mut window = stage.close(ts, &reading).unwrap_or_default();
    window.timestamp_ms = ts;
    sh.metrics.window.closed.inc();
    // How wrong the box's clock is travels too (docs/clock.md), and when
    // its certificate expires (the uplink's).
    window.samples.extend(era.error_ms.map(|e| (edge_wire::SeriesKey::new(clock::ERROR_MS, vec![]), e as f64)));
    window.samples.extend(sh.metrics.uplink.window_samples());
    // What a rollout watches (docs/remote-config.md): the probes attached,
    // and what became of remote documents and models.
    window.samples.extend(sh.probes.borrow().states.iter().map(|(name, state)| {
        let key = edge_wire::SeriesKey::new(probe::metrics::ATTACHED, vec![edge_wire::Label::new("probe", *name)]);
        (key, f64::from(u8::from(matches!(state, probe::ProbeState::Attached))))
    }));
    if sh.remote_on {
        window.samples.extend(remote::RESULTS.iter().map(|r| {
            let labels = metrics::ResultLabels { result: (*r).into() };
            let n = sh.metrics.remote_configs.get_or_create(&labels).get();
            (edge_wire::SeriesKey::new(remote::CONFIGS_TOTAL, vec![edge_wire::Label::new("result", *r)]), n as f64)
        }));
    }
    if sh.detect.borrow().state != detect::ModelState::Disabled {
        window.samples.extend(sh.metrics.detect.model_change_samples());
    }
    if sh.programs_on {
        window.samples.extend(probe_programs::RESULTS.iter().map(|r| {
            let n = sh.metrics.probe_programs.get_or_create(&metrics::ResultLabels { result: (*r).into() }).get();
            let key =
                edge_wire::SeriesKey::new(probe_programs::PROGRAMS_TOTAL, vec![edge_wire::Label::new("result", *r)]);
            (key, n as f64)
        }));
    }
    close_values(sh, &reading, &mut window);
    let alarm = detect_window(sh, &window);
    if let Some((event, fired)) = &alarm.action {
        let top = event.top.iter().map(|(f, share)| format!("{f}={share:.3}")).collect::<Vec<_>>().join(",");
        sh.audit.record(
            "action_fired",
            &[
                ("event", event.event.to_owned()),
                ("result", fired.label().unwrap_or("-").to_owned()),
                ("score", event.score.to_string()),
                ("threshold", event.threshold.to_string()),
                ("model_sha256", event.model_sha256.clone()),
                ("top_features", top),
            ],
        );
    }
    window.samples.extend(alarm.samples);
    store_window(
        sh.store,
        sh.metrics,
        recorder,
        era.new,
        alarm.record.map(|samples| window::Window { timestamp_ms: ts, samples, values: Vec::new() }),
        window,
    );
    sh.audit.record_drops(&mut uplink::lock(sh.store));
    release_free_heap();
    sh.metrics.observe_process();
}

/// Hands freed heap memory back to the system. glibc keeps it mapped (and
/// resident) after a burst of allocations: the probes' loading, or a
/// window's transient buffers (with 200 tags, +2.8 MiB of heap that a
/// window frees again). Once per window it costs a walk of the free lists;
/// musl returns memory by itself.
pub(crate) fn release_free_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Probes: one reading of every attached probe; their states and counts
/// into the metrics.
fn read_probes(sh: &Shared<'_>) -> probe::ProbeReading {
    let mut probes = sh.probes.borrow_mut();
    if probes.refresh() {
        sh.metrics.probes.set_states(&probes);
        sh.audit.record("probes_changed", &probe_fields(&probes));
    }
    let reading = probes.read();
    for probe in sh.metrics.probes.observe(&mut probes, &reading) {
        tracing::warn!(
            probe,
            "the kernel skipped this probe's program for some events (a BPF tracing program was already \
             running on that CPU); its counts are low by edge_agent_probe_missed_runs_total (docs/probes.md)"
        );
    }
    reading
}

/// What the clock says of this window.
pub struct Era {
    /// A new clock era (step, sync state, boot) starts here.
    pub new: bool,
    /// How far the wall clock is off the true time, when known.
    pub error_ms: Option<i64>,
}

/// Clock: the window's time; a new era is journalled with the records it
/// starts at. Public, with [`store_window`], for the fleet simulator
/// (hil-tests), which runs many devices' store and uplink in one process
/// through the agent's own code.
pub fn clock_era(store: &Mutex<Lanes>, clock: &Mutex<clock::Clock>, test_offset_ms: i64) -> (clock::Reading, Era) {
    let clocks = clock::read(test_offset_ms);
    let next = {
        let lanes = uplink::lock(store);
        [lanes.routine.next_seq(), lanes.priority.next_seq()]
    };
    let mut clock = uplink::lock(clock);
    let new = match clock.observe(&clocks, next) {
        Ok(new) => new,
        Err(e) => {
            tracing::error!(error = %e, "clock journal not saved");
            false
        }
    };
    if new {
        tracing::info!(
            boot = %clocks.boot_id,
            synced = clocks.synced,
            wall_minus_monotonic_ms = clocks.offset_ms(),
            first_seq = next[0],
            "new clock era"
        );
    }
    let error_ms = clock.error_ms(&clocks);
    (clocks, Era { new, error_ms })
}

/// A new clock era, in the audit trail.
fn audit_era(audit: &audit::Audit, clocks: &clock::Reading, era: &Era) {
    audit.record(
        "clock_era",
        &[
            ("boot", clocks.boot_id.to_string()),
            ("synced", clocks.synced.to_string()),
            ("wall_minus_monotonic_ms", clocks.offset_ms().to_string()),
            ("error_ms", era.error_ms.map_or("-".into(), |e| e.to_string())),
        ],
    );
}

/// Values: the window's process values, each at its own time, and per tag
/// statistics.
fn close_values(sh: &Shared<'_>, reading: &probe::ProbeReading, window: &mut window::Window) {
    let mut values = sh.values.borrow_mut();
    if let Some(p) = &reading.protocols {
        values.kernel_counts(p.values_lost, p.values_bad);
    }
    if let Some(d) = &reading.devices {
        values.serial_kernel_counts(d.bytes_lost, d.bytes_cut);
    }
    let closed = values.close(window.timestamp_ms);
    sh.metrics.observe_values(&values);
    window.samples.extend(closed.samples);
    window.values = closed.series;
}

/// Detect: the window's features through the model (a new model first,
/// if one came); the score's samples, and an alarm's record when it rose
/// or cleared.
fn detect_window(sh: &Shared<'_>, window: &window::Window) -> detect::Outcome {
    let mut detect = sh.detect.borrow_mut();
    if let Some(result) = detect.poll_updates() {
        sh.metrics.detect.model_changed(result);
        sh.metrics.detect.set_model_state(&detect);
    }
    let outcome = detect.observe(window.timestamp_ms, &window.samples, &features::tag_values(&window.values));
    sh.metrics.detect.observe(&outcome, detect.alarm.active, detect.warning.active);
    outcome
}

/// Store: the alarm's record into the priority lane, the window into the
/// routine lane (a new block at a new clock era).
pub fn store_window(
    store: &Mutex<Lanes>,
    metrics: &AgentMetrics,
    recorder: &mut Recorder,
    new_era: bool,
    alarm: Option<window::Window>,
    window: window::Window,
) {
    let mut lanes = uplink::lock(store);
    if new_era {
        recorder.new_era();
    }
    if let Some(record) = alarm {
        if let Err(e) = recorder.priority(&mut lanes, &record) {
            tracing::error!(error = %e, "anomaly record could not be stored");
        }
    }
    let series = window.samples.len();
    match recorder.routine(&mut lanes, window) {
        Ok(seq) => tracing::debug!(seq, series, "window stored"),
        Err(e) => {
            metrics.window.errors.inc();
            tracing::error!(error = %e, "window could not be stored");
        }
    }
    if let Err(e) = recorder.tick(&mut lanes) {
        tracing::error!(error = %e, "store sync failed");
    }
    metrics.observe_lanes(&lanes);
}

/// Tracing to stderr; `EDGE_AGENT_LOG` (or `RUST_LOG`) filters, default info.
pub fn init_logging(var: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env(var)
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}
