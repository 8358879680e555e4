"""The anomaly model's pipeline (docs/model.md): train on normal feature
windows, calibrate, convert, write the model card with golden vectors;
evaluate a model on labelled scenario runs.

  pipeline.py train --out DIR --normal CSV [CSV ...] [--eval RUN_DIR ...]
  pipeline.py evaluate --model DIR --run RUN_DIR [RUN_DIR ...] [--out DIR]
  pipeline.py report --model CARD --run RUN_DIR [--out DIR]
  pipeline.py compare --model DIR --normal CSV [CSV ...] --run RUN_DIR [...] [--history H ...]
  pipeline.py sign --model DIR --key KEY.pem

Input: CSVs of `edge-agent store export --format features`
(docs/features.md), one row per window. Run with model/run.sh, which
provides the pinned environment (model/requirements.txt).
"""

import argparse
import csv
import datetime
import hashlib
import json
import os
import sys

import numpy as np

SEED = 0
CARD_VERSION = 2
# Exports this pipeline reads: version 2 keeps every definition of 1.
FEATURE_VERSIONS = ("1", "2")
HIDDEN = (16, 4)
EPOCHS = 300
# Normalised inputs are clipped to this, so a wild value cannot overflow
# the score; far beyond any threshold anyway.
CLIP = 1000.0
# The floor of a log-transformed feature's std (in ln units: a rate or a
# count that never moved in training may move by 10 % before z reaches 1).
STD_FLOOR = 0.1
# A linear feature's std is at least this fraction of its mean's size, or
# the smallest step between its training values (the sensor's resolution):
# the floor is in the feature's own units, never a global constant.
RELATIVE_FLOOR = 1e-3
META = ("timestamp_ms", "time", "feature_version", "window_s")


def transform_of(name):
    """`linear` for a process value's statistics (physical, signed, any
    size); `log` for rates, ratios, latencies and counts (docs/model.md)."""
    base = name.split("{", 1)[0]
    return "linear" if base.startswith("value_") and base != "value_count" else "log"


def scale_of(name):
    """Units before the log: latencies in ms, ratios in percent; 1 for a
    linear feature."""
    base = name.split("{", 1)[0]
    if transform_of(name) == "linear":
        return 1.0
    if base.endswith("_s") and not base.endswith("_per_s"):
        return 1000.0
    if base.endswith("_ratio"):
        return 100.0
    return 1.0


def read_features(path):
    """(timestamps, window_s, {feature: column}, feature version) of one
    export (gzip-compressed when its name ends in .gz)."""
    import gzip
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        sys.exit(f"{path}: empty (expected a header: {', '.join(META)}, features...)")
    header = rows[0]
    for m in META:
        if m not in header:
            sys.exit(f"{path}: no column {m!r}: not an `edge-agent store export --format features` CSV")
    ix = {h: i for i, h in enumerate(header)}
    data = rows[1:]
    for r in data:
        if r[ix["feature_version"]] not in FEATURE_VERSIONS:
            sys.exit(f"{path}: feature_version {r[ix['feature_version']]}, this pipeline reads {', '.join(FEATURE_VERSIONS)}")
    ts = np.array([int(r[ix["timestamp_ms"]]) for r in data], dtype=np.int64)
    win = np.array([float(r[ix["window_s"]]) for r in data])
    cols = {h: np.array([float(r[i]) for r in data]) for h, i in ix.items() if h not in META}
    version = max((int(r[ix["feature_version"]]) for r in data), default=1)
    return ts, win, cols, version


def matrix(cols, names, n):
    """Rows in `names` order; a feature the export lacks is 0 (as the agent does)."""
    return np.stack([cols.get(name, np.zeros(n)) for name in names], axis=1) if names else np.zeros((n, 0))


def transformed(raw, features):
    """Each column in its feature's units before standardising: ln(1 +
    scale x) (x below 0 taken as 0) for `log`, scale x for `linear`."""
    scale = np.array([f["scale"] for f in features])
    log = np.array([f["transform"] == "log" for f in features])
    u = raw * scale
    return np.where(log, np.log1p(np.maximum(u, 0.0)), u)


def normalise(raw, features):
    mean = np.array([f["mean"] for f in features])
    std = np.array([f["std"] for f in features])
    z = (transformed(raw, features) - mean) / std
    return np.clip(z, -CLIP, CLIP).astype(np.float32)


def tag_of(name):
    """The tag of a `value_*{tag}` feature, else None."""
    if not name.startswith("value_") or "{" not in name:
        return None
    return name.split("{", 1)[1].rstrip("}")


DISPERSION = ("value_std", "value_slope_per_s", "value_band")


def tag_resolutions(names, fit_raw):
    """Per tag: the smallest step between the distinct readings the
    training saw (its `value_min`, `value_max` and `value_last`): the
    sensor's resolution as the data shows it (a register scaled by 0.01
    reads in steps of 0.01; a setpoint an HMI writes, in its own steps).
    A tag that read one value only: 1e-3 of its size."""
    readings = {}
    for i, name in enumerate(names):
        base, tag = name.split("{", 1)[0], tag_of(name)
        if tag is not None and base in ("value_min", "value_max", "value_last"):
            readings.setdefault(tag, []).append(fit_raw[:, i])
    out = {}
    for tag, cols in readings.items():
        v = np.unique(np.concatenate(cols))
        steps = np.diff(v)
        out[tag] = float(steps.min()) if len(steps) else RELATIVE_FLOOR * float(np.abs(v).max(initial=0.0))
    return out


def fit_normalisation(names, fit_raw, window_s=10.0):
    """Per feature: its transform, scale, and the mean and floored std of
    the transformed training values (docs/model.md)."""
    resolution_of = tag_resolutions(names, fit_raw)
    features = []
    for i, name in enumerate(names):
        t, scale = transform_of(name), scale_of(name)
        spec = {"name": name, "transform": t, "scale": scale}
        u = transformed(fit_raw[:, i:i + 1], [spec])[:, 0]
        mean = float(u.mean())
        if t == "log":
            floor = STD_FLOOR
        else:
            steps = np.diff(np.unique(u))
            resolution = float(steps.min()) if len(steps) else 0.0
            floor = max(RELATIVE_FLOOR * abs(mean), resolution, np.finfo(np.float32).tiny)
            # A spread (std, slope, band energy) below one step of its
            # sensor is no signal: a feature that the poll schedule alone
            # sets (a setpoint written every tenth poll) may not read as
            # exact in the model.
            tag = tag_of(name)
            if name.startswith(DISPERSION) and tag in resolution_of:
                step = resolution_of[tag] / (window_s if name.startswith("value_slope_per_s") else 1.0)
                floor = max(floor, step)
        features.append({**spec, "mean": mean, "std": float(max(u.std(), floor)), "std_floor": float(floor)})
    return features


def build(n):
    import tensorflow as tf

    inp = tf.keras.Input(shape=(n,), name="features")
    x = inp
    for h in HIDDEN:
        x = tf.keras.layers.Dense(h, activation="relu")(x)
    for h in reversed(HIDDEN[:-1]):
        x = tf.keras.layers.Dense(h, activation="relu")(x)
    out = tf.keras.layers.Dense(n, name="reconstruction")(x)
    return tf.keras.Model(inp, out)


def convert(model):
    """Float32 TFLite: no quantisation (the agent's TF Lite 1.15 runtime
    silently miscomputes int8 models from current converters)."""
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = []
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    return conv.convert()


class Reference:
    """The reference interpreter (ai-edge-litert) on a .tflite model."""

    def __init__(self, tflite_bytes):
        from ai_edge_litert.interpreter import Interpreter

        self.it = Interpreter(model_content=tflite_bytes)
        self.it.allocate_tensors()
        self.inp = self.it.get_input_details()[0]
        self.out = self.it.get_output_details()[0]

    def run(self, z):
        outs = []
        for row in z:
            self.it.set_tensor(self.inp["index"], row.reshape(1, -1).astype(np.float32))
            self.it.invoke()
            outs.append(self.it.get_tensor(self.out["index"])[0].copy())
        return np.array(outs, dtype=np.float32)


def scores_of(z, recon):
    return np.mean((z.astype(np.float64) - recon.astype(np.float64)) ** 2, axis=1)


def train(args):
    import tensorflow as tf

    tf.keras.utils.set_random_seed(SEED)
    tf.config.experimental.enable_op_determinism()
    parts = [read_features(p) for p in args.normal]
    # The `other` port class (every port no class names: whatever else runs
    # on the box, admin sessions, updates, other tests) is left out by
    # default: its traffic is not the line's, and its noise would set the
    # threshold. A port class in the agent's config makes traffic modelled.
    import re
    exclude = re.compile(args.exclude) if args.exclude else None
    include = re.compile(args.include) if args.include else None
    names = sorted({n for _, _, cols, _ in parts for n in cols
                    if not (exclude and exclude.search(n)) and (include is None or include.search(n))})
    if not names:
        sys.exit("no feature columns in the training data")
    ts = np.concatenate([p[0] for p in parts])
    win = np.concatenate([p[1] for p in parts])
    raw = np.concatenate([matrix(p[2], names, len(p[0])) for p in parts])
    order = np.argsort(ts, kind="stable")
    ts, win, raw = ts[order], win[order], raw[order]
    # Partial windows (a restart, a reload, the agent's shutdown) and gaps:
    # their rates are over another length than the rest; the agent does
    # not score windows under half its length either.
    typical = np.median(win)
    keep = (win >= 0.5 * typical) & (win <= 1.5 * typical)
    dropped = int((~keep).sum())
    ts, win, raw = ts[keep], win[keep], raw[keep]
    n = len(ts)
    if n < 50:
        sys.exit(f"only {n} windows of normal data: record more (at least 50; hours are better)")
    # Held out: the last quarter in time, never seen by training.
    cut = int(n * 0.75)
    # A feature whose last quarter in some export lies wholly outside what
    # that export's first three quarters saw is a trend, not a state (a
    # counter or a clock in a register: its mean grows for ever): no model
    # of normal can know its next value. Left out, and named in the card.
    def outside(col):
        c = int(len(col) * 0.75)
        return len(col) >= 8 and (col[c:].min() > col[:c].max() or col[c:].max() < col[:c].min())

    def full(p):  # the export's full windows
        return (p[1] >= 0.5 * typical) & (p[1] <= 1.5 * typical)

    trending = [name for name in names if any(outside(p[2][name][full(p)]) for p in parts if name in p[2])]
    if trending:
        print(f"left out (trending: an export's last quarter outside the range of its first three): {', '.join(trending)}")
        kept = [i for i, name in enumerate(names) if name not in trending]
        names = [names[i] for i in kept]
        raw = raw[:, kept]
    fit_raw, held_raw = raw[:cut], raw[cut:]
    features = fit_normalisation(names, fit_raw, float(np.median(win)))
    z_fit, z_held = normalise(fit_raw, features), normalise(held_raw, features)
    model = build(len(names))
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss="mse")
    # Validation: a tenth of the training part (also in time order).
    vcut = int(len(z_fit) * 0.9)
    stop = tf.keras.callbacks.EarlyStopping(patience=30, restore_best_weights=True)
    hist = model.fit(z_fit[:vcut], z_fit[:vcut], validation_data=(z_fit[vcut:], z_fit[vcut:]),
                     epochs=EPOCHS, batch_size=32, shuffle=True, verbose=0, callbacks=[stop])
    tfl = convert(model)
    ref = Reference(tfl)
    s_fit, s_held = scores_of(z_fit, ref.run(z_fit)), scores_of(z_held, ref.run(z_held))
    # The threshold, for the agent's alarm rule (raise after `raise_after`
    # consecutive windows above it): a margin over the larger of the
    # held-out windows' maximum and the highest score that `raise_after`
    # consecutive normal windows (training and held-out) all reached. A
    # lone spike in the training data (a 7 ms connect under CPU load) is
    # what the debounce absorbs; it does not set the threshold.
    s_all = np.concatenate([s_fit, s_held])

    def base_for(k):
        runs = np.array([s_all[i:i + k].min() for i in range(len(s_all) - k + 1)])
        return float(max(s_held.max(), runs.max())), float(runs.max())

    k = args.raise_after
    base, run_max = base_for(k)
    threshold = base * args.margin
    warn = None
    if args.warn_margin >= args.margin:
        sys.exit(f"--warn-margin {args.warn_margin} is not below --margin {args.margin}: the warn level must be "
                 "the more sensitive one (0: no warn level)")
    if args.warn_margin > 0:
        warn_base, _ = base_for(args.warn_raise_after)
        # Never above the stop level's (a shorter debounce may have a
        # higher base): a warning comes first or with the stop.
        warn = {"threshold": min(warn_base * args.warn_margin, threshold), "raise_after": args.warn_raise_after,
                "margin": args.warn_margin}

    os.makedirs(args.out, exist_ok=True)
    model_path = os.path.join(args.out, "anomaly.tflite")
    with open(model_path, "wb") as f:
        f.write(tfl)
    # Golden vectors: held-out windows (the quietest, the median, the
    # busiest by score), the training mean, and a window of refusals and
    # retransmits far outside normal, so both sides of the threshold are
    # checked at load.
    pick = sorted(set(int(i) for i in [np.argmin(s_held), np.argsort(s_held)[len(s_held) // 2], np.argmax(s_held)]))
    golden_raw = [held_raw[i] for i in pick]
    golden_raw.append(fit_raw.mean(axis=0))
    wild = fit_raw.mean(axis=0).copy()
    for i, name in enumerate(names):
        if name.startswith(("tcp_refused_per_s", "tcp_retransmits_per_s", "dev_error_ratio")):
            wild[i] = 50.0 if "ratio" not in name else 0.5
        elif features[i]["transform"] == "linear":
            # A process value far off (ten of its standard deviations).
            wild[i] += 10.0 * features[i]["std"] / features[i]["scale"]
    golden_raw.append(wild)
    golden_raw = np.array(golden_raw)
    gz = normalise(golden_raw, features)
    gout = ref.run(gz)
    gscore = scores_of(gz, gout)
    golden = [{"raw": [float(v) for v in golden_raw[i]], "input": [float(v) for v in gz[i]],
               "output": [float(v) for v in gout[i]], "score": float(gscore[i])} for i in range(len(gz))]

    def when(ms):
        return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).isoformat(timespec="seconds")

    card = {
        "format": "edge-agent-model-card",
        "card_version": CARD_VERSION,
        "name": args.name,
        "created": when(int(ts[-1])) if args.reproducible else datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # The oldest definitions that cover the data: an agent computing
        # them (or any later version) can run the model.
        "feature_version": max(p[3] for p in parts),
        "window_s": float(np.median(win)),
        "model_file": "anomaly.tflite",
        "model_sha256": hashlib.sha256(tfl).hexdigest(),
        "input": {"transform": "z = clip((u - mean) / std, -clip, clip); u = ln(1 + scale * max(x, 0)) (log) or scale * x (linear)",
                  "clip": CLIP},
        "features": features,
        "score": "mean squared error between input z and output",
        "threshold_rule": "margin x max(held-out maximum, the highest score raise_after consecutive normal "
                          "windows all reached)",
        "threshold": threshold,
        "raise_after": k,
        "margin": args.margin,
        "golden": golden,
        "golden_tolerance": {"relative": 1e-4, "absolute": 1e-5},
        **({"warn": warn} if warn else {}),
        "training": {
            "sources": [os.path.basename(os.path.dirname(os.path.abspath(p))) + "/" + os.path.basename(p) for p in args.normal],
            "windows": int(n), "fit_windows": int(cut), "heldout_windows": int(n - cut),
            "dropped_windows": dropped,
            "from": when(int(ts[0])), "to": when(int(ts[-1])),
            "epochs_run": len(hist.history["loss"]), "final_loss": float(hist.history["loss"][-1]),
            "final_val_loss": float(hist.history["val_loss"][-1]),
            "fit_score_p50": float(np.median(s_fit)), "fit_score_p999": float(np.quantile(s_fit, 0.999)),
            "heldout_score_p50": float(np.median(s_held)), "heldout_score_max": float(s_held.max()),
            "threshold_margin": args.margin,
            "run_score_max": run_max, "fit_score_max": float(s_fit.max()),
            "architecture": f"dense {len(names)}-" + "-".join(str(h) for h in HIDDEN + tuple(reversed(HIDDEN[:-1]))) + f"-{len(names)}, relu, float32",
            "tensorflow": tf.__version__, "seed": SEED, "about": args.about, "excluded": args.exclude,
            "included": args.include, "trending": trending,
        },
    }
    with open(os.path.join(args.out, "anomaly.card.json"), "w") as f:
        json.dump(card, f, indent=1)
        f.write("\n")
    report = os.path.join(args.out, "report")
    os.makedirs(report, exist_ok=True)
    plot_distribution(os.path.join(report, "scores_normal.png"), {"training": s_fit, "held-out": s_held}, threshold,
                      "Scores of normal windows")
    runs = [evaluate_run(card, tfl, r) for r in (args.eval or [])]
    if runs:
        write_evaluation(report, card, runs)
    write_model_card_md(args.out, card, runs)
    print(f"wrote {model_path} ({len(tfl)} bytes, {len(names)} features), threshold {threshold:.4g}, "
          f"held-out max {s_held.max():.4g}; {args.out}/MODEL_CARD.md")


def load_model(d):
    with open(os.path.join(d, "anomaly.card.json")) as f:
        card = json.load(f)
    with open(os.path.join(d, card["model_file"]), "rb") as f:
        tfl = f.read()
    if hashlib.sha256(tfl).hexdigest() != card["model_sha256"]:
        sys.exit(f"{d}: {card['model_file']} does not match the card's model_sha256")
    return card, tfl


def read_labels(path):
    with open(path, newline="") as f:
        return [(int(r["start_ms"]), int(r["end_ms"]), r["fault"]) for r in csv.DictReader(f)]


def evaluate_run(card, tfl, run_dir):
    """Reference scores of a scenario run's windows, and their labels: a
    window is faulty when a fault covers at least half of it."""
    ts, win, cols, _ = read_features(os.path.join(run_dir, "features.csv"))
    # As the agent: windows under half the model's length are not scored.
    keep = win >= 0.5 * card["window_s"]
    ts, win, cols = ts[keep], win[keep], {k: v[keep] for k, v in cols.items()}
    names = [f["name"] for f in card["features"]]
    z = normalise(matrix(cols, names, len(ts)), card["features"])
    scores = scores_of(z, Reference(tfl).run(z))
    labels = read_labels(os.path.join(run_dir, "labels.csv")) if os.path.exists(os.path.join(run_dir, "labels.csv")) else []
    fault = [""] * len(ts)
    for i, (t, w) in enumerate(zip(ts, win)):
        start = t - int(w * 1000)
        for a, b, name in labels:
            if min(b, t) - max(a, start) >= w * 500:
                fault[i] = name
    unknown = set(cols) - set(names)
    # The window truth of "Operating points" (docs/model.md): partly covered
    # and recovering windows count neither way.
    path = os.path.join(run_dir, "labels.csv")
    truth = window_truth(ts, int(round(card["window_s"] * 1000)), read_run_labels(path)) if os.path.exists(path) else [""] * len(ts)
    return {"dir": run_dir, "ts": ts, "scores": scores, "fault": fault, "labels": labels, "unknown": sorted(unknown),
            "truth": truth}


def plot_distribution(path, groups, threshold, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    allv = np.concatenate([v for v in groups.values() if len(v)])
    lo, hi = max(allv.min(), 1e-6), max(allv.max(), threshold) * 1.5
    bins = np.logspace(np.log10(lo), np.log10(hi), 60)
    for name, v in groups.items():
        if len(v):
            ax.hist(v, bins=bins, alpha=0.6, label=f"{name} ({len(v)})")
    ax.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("score (mean squared reconstruction error)")
    ax.set_ylabel("windows")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def roc(scores, positive):
    order = np.argsort(-scores)
    p, n = positive.sum(), (~positive).sum()
    tpr = np.concatenate([[0], np.cumsum(positive[order]) / max(p, 1)])
    fpr = np.concatenate([[0], np.cumsum(~positive[order]) / max(n, 1)])
    return fpr, tpr, float(np.trapezoid(tpr, fpr))


def write_evaluation(report, card, runs):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = np.concatenate([r["scores"] for r in runs])
    fault = np.array(sum((r["fault"] for r in runs), []))
    positive = fault != ""
    thr = card["threshold"]
    groups = {"normal": scores[~positive]}
    for name in sorted(set(fault[positive])):
        groups[name] = scores[fault == name]
    plot_distribution(os.path.join(report, "scores_by_scenario.png"), groups, thr, "Scores by scenario (reference interpreter)")
    fpr, tpr, auc = roc(scores, positive)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"AUC {auc:.3f}")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_xlabel("false positive rate (windows)")
    ax.set_ylabel("true positive rate (windows)")
    ax.set_title("ROC over every window of the runs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(report, "roc.png"), dpi=100)
    plt.close(fig)
    det = per_scenario(runs, thr)
    fig, ax = plt.subplots(figsize=(7, 4))
    names = sorted(det)
    ax.bar(names, [det[n]["detected"] / det[n]["injected"] for n in names])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("faults detected (window score above threshold)")
    ax.set_title("Per-scenario detection (reference interpreter)")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(os.path.join(report, "detection.png"), dpi=100)
    plt.close(fig)
    pred = scores > thr
    tp, fp, fn = int((pred & positive).sum()), int((pred & ~positive).sum()), int((~pred & positive).sum())
    f1 = 2 * tp / max(2 * tp + fp + fn, 1)
    summary = {"windows": int(len(scores)), "faulty_windows": int(positive.sum()), "tp": tp, "fp": fp, "fn": fn,
               "f1": f1, "auc": auc, "per_scenario": det, "point_wise": point_wise(card, runs)}
    with open(os.path.join(report, "evaluation.json"), "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    return summary


def point_wise(card, runs):
    """Per level: point-wise F1, FAR and MAR of the score against the
    level's threshold, and of the agent's debounced state (clear after 3),
    over the windows that count (docs/model.md, "Operating points")."""
    levels = [("stop", card["threshold"], card.get("raise_after", 1))]
    if card.get("warn"):
        levels.append(("warn", card["warn"]["threshold"], card["warn"]["raise_after"]))
    out = {}
    truth = sum((r["truth"] for r in runs), [])
    for name, thr, k in levels:
        above = np.concatenate([r["scores"] > thr for r in runs])
        state = np.concatenate([debounced(r["scores"] > thr, k, 3) for r in runs])
        out[name] = {"threshold": thr, "score": confusion(above, truth), "debounced": confusion(state, truth)}
    return out


def per_scenario(runs, thr):
    """Per injected fault: detected (some window it covers scores above the
    threshold) and after how many of its windows."""
    out = {}
    for r in runs:
        for a, b, name in r["labels"]:
            idx = [i for i, f in enumerate(r["fault"]) if f == name and a <= r["ts"][i] <= b + 60_000]
            # The windows this fault covers, in order.
            idx = [i for i in idx if r["fault"][i] == name]
            d = out.setdefault(name, {"injected": 0, "detected": 0, "windows_to_detect": []})
            d["injected"] += 1
            hits = [k for k, i in enumerate(idx) if r["scores"][i] > thr]
            if hits:
                d["detected"] += 1
                d["windows_to_detect"].append(hits[0] + 1)
    return out


def write_model_card_md(out, card, runs):
    t = card["training"]
    lines = [
        f"# Model card: {card['name']}",
        "",
        "Written by `model/run.sh train` (model/pipeline.py); the machine-readable",
        "card the agent loads is `anomaly.card.json` (format: docs/model.md).",
        "",
        "## What it is",
        f"- A float32 dense autoencoder ({t['architecture']}), TensorFlow {t['tensorflow']}, seed {t['seed']}.",
        f"- Input: feature vectors version {card['feature_version']} (docs/features.md) of "
        f"{card['window_s']:g} s windows, {len(card['features'])} features, normalised as `{card['input']['transform']}`.",
        f"- Score: {card['score']}; alarm threshold **{card['threshold']:.6g}**"
        f" ({t['threshold_margin']} x the larger of the held-out maximum, {t['heldout_score_max']:.4g}, and the highest score"
        f" {card['raise_after']} consecutive normal windows all reached, {t['run_score_max']:.4g}: the agent raises its alarm"
        f" after {card['raise_after']} windows above it (detect.raise_after), so a lone spike in normal data,"
        f" the largest {t['fit_score_max']:.4g}, does not set it).",
        f"- Model file sha256 `{card['model_sha256']}`.",
        "",
        "## Training data",
        f"- Sources: {', '.join(t['sources'])}; {t['windows']} windows from {t['from']} to {t['to']}"
        f" ({t.get('dropped_windows', 0)} partial or gap windows left out: length outside 0.5-1.5 x the median).",
        f"- The first {t['fit_windows']} windows trained it (the last tenth of them for early stopping);"
        f" the last {t['heldout_windows']} (in time) were held out to calibrate the threshold.",
        f"- Epochs run {t['epochs_run']}, final loss {t['final_loss']:.4g}, validation loss {t['final_val_loss']:.4g}.",
        f"- Scores: training median {t['fit_score_p50']:.4g}, 99.9th percentile {t['fit_score_p999']:.4g};"
        f" held-out median {t['heldout_score_p50']:.4g}, maximum {t['heldout_score_max']:.4g}.",
        "- Distribution: report/scores_normal.png.",
    ] + ([f"- How the data was recorded: {card['training']['about']}"] if card["training"].get("about") else []) + [
        "",
        "## Features and normalisation",
        "",
        "| feature | scale | mean | std |",
        "|---|---|---|---|",
    ]
    for f in card["features"]:
        lines.append(f"| `{f['name']}` | {f['scale']:g} | {f['mean']:.4g} | {f['std']:.4g} |")
    lines += ["", "## Golden vectors", "",
              f"{len(card['golden'])} input/output pairs from the reference interpreter (ai-edge-litert);"
              " the agent runs them at load and refuses the model if its outputs differ by more than"
              f" {card['golden_tolerance']['relative']} relative + {card['golden_tolerance']['absolute']} absolute.",
              "Scores: " + ", ".join(f"{g['score']:.4g}" for g in card["golden"]) + "."]
    if runs:
        with open(os.path.join(out, "report", "evaluation.json")) as f:
            ev = json.load(f)
        lines += ["", "## Evaluation (reference interpreter, labelled scenario runs)", "",
                  f"Runs: {', '.join(os.path.basename(r['dir'].rstrip('/')) for r in runs)}; {ev['windows']} windows,"
                  f" {ev['faulty_windows']} faulty. Window-level F1 {ev['f1']:.3f} (tp {ev['tp']}, fp {ev['fp']}, fn {ev['fn']}),"
                  f" ROC AUC {ev['auc']:.3f}.", "",
                  "| fault | injected | detected | windows to detect |", "|---|---|---|---|"]
        for name, d in sorted(ev["per_scenario"].items()):
            lines.append(f"| {name} | {d['injected']} | {d['detected']} | {', '.join(map(str, d['windows_to_detect'])) or '-'} |")
        lines += ["", "Plots: report/scores_by_scenario.png, report/roc.png, report/detection.png."]
    with open(os.path.join(out, "MODEL_CARD.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def evaluate(args):
    card, tfl = load_model(args.model)
    runs = [evaluate_run(card, tfl, r) for r in args.run]
    out = args.out or os.path.join(args.model, "report")
    os.makedirs(out, exist_ok=True)
    ev = write_evaluation(out, card, runs)
    print(json.dumps(ev, indent=1))


def window_truth(ts, win_ms, labels):
    """Per window (ts - win_ms, ts]: the fault covering at least half of it,
    "" for normal, None when it counts neither way (a fault covers less
    than half, or the process is still recovering after one): as the
    scenario runner's report (hil-tests/src/evaluation.rs)."""
    out = []
    for t in ts:
        frm = t - win_ms
        truth = ""
        for a, b, name, rec in labels:
            if (min(b, t) - max(a, frm)) * 2 >= win_ms:
                truth = name
                break
        else:
            if any(a < t and max(rec, b) > frm for a, b, _, rec in labels):
                truth = None
        out.append(truth)
    return out


def debounced(above, raise_after, clear_after):
    """The agent's alarm state per window: raised after `raise_after`
    windows above in a row, cleared after `clear_after` below in a row."""
    state, up, down, out = False, 0, 0, []
    for a in above:
        up, down = (up + 1, 0) if a else (0, down + 1)
        if not state and up >= raise_after:
            state = True
        elif state and down >= clear_after:
            state = False
        out.append(state)
    return np.array(out, dtype=bool)


def read_agent_scores(path):
    """(ts, score) of every scored window of a samples export."""
    by = {}
    with open(path, newline="") as f:
        for r in csv.reader(f):
            if len(r) >= 5 and r[2] == "edge_anomaly_score":
                by[int(r[0])] = float(r[-1])
    ts = np.array(sorted(by), dtype=np.int64)
    return ts, np.array([by[t] for t in ts])


def read_run_labels(path):
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            a, b = int(r["start_ms"]), int(r["end_ms"])
            out.append((a, b, r["fault"], int(r.get("recovered_ms") or b)))
    return out


def confusion(decided, truth, hold=0):
    """Point-wise counts over the windows that count. With `hold` (a
    debounced state's clear_after): a normal window counts neither way
    while the state has been on without a break since a faulty window and
    at most `hold` windows separate the two (as the scenario runner's
    report, hil-tests/src/evaluation.rs)."""
    c = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    since = None
    for d, t in zip(decided, truth):
        since = None if not d else 0 if t else (since + 1 if since is not None else None)
        if t is None or (d and t == "" and since is not None and since <= hold):
            continue
        c[("tp" if d else "fn") if t else ("fp" if d else "tn")] += 1
    tp, fp, fn, tn = c["tp"], c["fp"], c["fn"], c["tn"]
    c["f1"] = 2 * tp / max(2 * tp + fp + fn, 1)
    c["far"] = fp / max(fp + tn, 1)
    c["mar"] = fn / max(fn + tp, 1)
    return c


MARGINS = (1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)


def report(args):
    """Plots and operating points of a scenario run (`scenarios
    pump-evaluate`) from the agent's own scores: score against time with
    the fault spans, windows to detect per fault, and the false-alarm rate
    against the missed-alarm rate at several margins, each with the
    card's debounce (docs/model.md, "Operating points")."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(args.model) as f:
        card = json.load(f)
    out = args.out or args.run
    os.makedirs(out, exist_ok=True)
    # The agent's samples export, or its anomaly series alone (scores.csv:
    # the same columns; what model/pump/report/ keeps).
    samples = os.path.join(args.run, "samples.csv")
    ts, scores = read_agent_scores(samples if os.path.exists(samples) else os.path.join(args.run, "scores.csv"))
    labels = read_run_labels(os.path.join(args.run, "labels.csv"))
    win_ms = int(round(card["window_s"] * 1000))
    truth = window_truth(ts, win_ms, labels)
    base = card["threshold"] / card["margin"]
    k = card.get("raise_after", 2)
    warn = card.get("warn")
    levels = [("stop", card["threshold"], k, args.clear_after)]
    if warn:
        levels.append(("warn", warn["threshold"], warn["raise_after"], args.warn_clear_after))
    # Score against time.
    t0 = labels[0][0] if labels else int(ts[0])
    minutes = (ts - t0) / 60000.0
    colours = {}
    palette = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(14, 4.5))
    for a, b, name, rec in labels:
        c = colours.setdefault(name, palette(len(colours) % 10))
        ax.axvspan((a - t0) / 60000, (b - t0) / 60000, color=c, alpha=0.3,
                   label=name if name not in ax.get_legend_handles_labels()[1] else None)
        if rec > b:
            ax.axvspan((b - t0) / 60000, (rec - t0) / 60000, color="grey", alpha=0.12, hatch="//",
                       label="recovering" if "recovering" not in ax.get_legend_handles_labels()[1] else None)
    ax.plot(minutes, np.maximum(scores, 1e-6), color="black", linewidth=0.7, label="score (the agent's)")
    for name, thr, _, _ in levels:
        ax.axhline(thr, color="red" if name == "stop" else "orange", linestyle="--", label=f"{name} {thr:.3g}")
    ax.set_yscale("log")
    ax.set_xlabel("minutes since the first fault")
    ax.set_ylabel("anomaly score")
    ax.set_title(f"{card['name']}: the agent's score per {card['window_s']:g} s window, faults shaded")
    ax.legend(loc="upper left", fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "score_vs_time.png"), dpi=100)
    plt.close(fig)
    # Windows to detect per injection, per level.
    per = {}
    for name, thr, ra, ca in levels:
        state = debounced(scores > thr, ra, ca)
        for a, b, fault, _ in labels:
            idx = [i for i, t in enumerate(ts) if a < t <= b + win_ms]
            hit = next((j + 1 for j, i in enumerate(idx) if state[i]), None)
            per.setdefault(fault, {}).setdefault(name, []).append(hit)
    fig, ax = plt.subplots(figsize=(8, 4))
    faults = sorted(per)
    width = 0.8 / len(levels)
    for j, (name, *_r) in enumerate(levels):
        vals = [np.mean([h for h in per[f][name] if h]) if any(per[f][name]) else 0 for f in faults]
        ax.bar(np.arange(len(faults)) + j * width, vals, width, label=f"{name} (0: not detected)",
               color="red" if name == "stop" else "orange")
    ax.set_xticks(np.arange(len(faults)) + width * (len(levels) - 1) / 2)
    ax.set_xticklabels(faults, rotation=20, ha="right")
    ax.set_ylabel("windows to detect (mean)")
    ax.set_title("Detection delay per fault class")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "delays.png"), dpi=100)
    plt.close(fig)
    # Operating points: margins over the card's base, with each level's
    # debounce, over the windows that count.
    rows = []
    for name, _, ra, ca in levels:
        for m in MARGINS:
            state = debounced(scores > base * m, ra, ca)
            c = confusion(state, truth)
            held = confusion(state, truth, hold=ca)
            detected = len({f for a, b, f, _r in labels if state[(ts > a) & (ts <= b + win_ms)].any()})
            rows.append({"level": name, "margin": m, "threshold": base * m, "raise_after": ra, "clear_after": ca,
                         "classes_detected": detected, **c,
                         "without_hold": {k: held[k] for k in ("fp", "f1", "far")}})
    fig, ax = plt.subplots(figsize=(6, 5))
    for name, *_r in levels:
        r = [x for x in rows if x["level"] == name]
        ax.plot([100 * x["far"] for x in r], [100 * x["mar"] for x in r], marker="o", label=f"{name} debounce")
        for x in r:
            ax.annotate(f"{x['margin']:g}", (100 * x["far"], 100 * x["mar"]), fontsize=7)
    ax.set_xlabel("false-alarm rate, % of normal windows")
    ax.set_ylabel("missed-alarm rate, % of faulty windows")
    ax.set_title("Operating points (labels: margin)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "operating_points.png"), dpi=100)
    plt.close(fig)
    lines = ["# Operating points", "",
             f"The agent's scores of {len(ts)} windows of {os.path.basename(os.path.normpath(args.run))}, the card's base"
             f" {base:.4g} (its threshold {card['threshold']:.4g} / its margin {card['margin']:g}) times each margin,"
             " with each level's debounce (raise after, clear after); windows that count neither way (a fault covering"
             " less than half, a process recovering) left out. Without the hold: the windows after a fault while"
             " the state, on since the fault, is within clear_after windows of its last window, left out too."
             " The card's own margins: stop"
             f" {card['margin']:g}" + (f", warn {warn['margin']:g}" if warn else "") + ".", "",
             "| level | margin | threshold | raise/clear after | fault classes detected | F1 | FAR | MAR"
             " | without the hold: F1 | FAR |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        h = x["without_hold"]
        lines.append(f"| {x['level']} | {x['margin']:g} | {x['threshold']:.4g} | {x['raise_after']}/{x['clear_after']} |"
                     f" {x['classes_detected']} of {len(per)} | {x['f1']:.3f} | {100 * x['far']:.2f} % | {100 * x['mar']:.2f} % |"
                     f" {h['f1']:.3f} | {100 * h['far']:.2f} % |")
    lines += ["", "Plots: score_vs_time.png, delays.png, operating_points.png."]
    with open(os.path.join(out, "operating_points.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "operating_points.json"), "w") as f:
        json.dump(rows, f, indent=1)
        f.write("\n")
    print("\n".join(lines))


def stacked(z, h):
    """Each window with the h - 1 before it, flattened (oldest first); the
    first h - 1 windows have no full history and are dropped."""
    if h == 1:
        return z
    return np.stack([z[i - h + 1:i + 1].reshape(-1) for i in range(h - 1, len(z))])


def build_history(n, h, kind):
    """An autoencoder over h consecutive windows of n features: `dense`
    (the flattened history through the same hidden sizes) or `conv` (a
    Conv1D over time, kernel 2, then dense)."""
    import tensorflow as tf

    inp = tf.keras.Input(shape=(n * h,), name="features")
    if kind == "conv":
        x = tf.keras.layers.Reshape((h, n))(inp)
        x = tf.keras.layers.Conv1D(HIDDEN[0], min(2, h), activation="relu")(x)
        x = tf.keras.layers.Flatten()(x)
    else:
        x = tf.keras.layers.Dense(HIDDEN[0], activation="relu")(inp)
    for hsize in HIDDEN[1:]:
        x = tf.keras.layers.Dense(hsize, activation="relu")(x)
    for hsize in reversed(HIDDEN[:-1]):
        x = tf.keras.layers.Dense(hsize, activation="relu")(x)
    out = tf.keras.layers.Dense(n * h, name="reconstruction")(x)
    return tf.keras.Model(inp, out)


def compare(args):
    """Models over a short history of windows against the one-window model,
    trained on the same normal data as `model`'s card (its features and
    normalisation), thresholds by the card's rule and margins, scored on
    labelled runs with the agent's debounce: is a history worth keeping?"""
    import tensorflow as tf

    card, _ = load_model(args.model)
    feats = card["features"]
    names = [f["name"] for f in feats]
    parts = [read_features(p) for p in args.normal]
    ts = np.concatenate([p[0] for p in parts])
    raw = np.concatenate([matrix(p[2], names, len(p[0])) for p in parts])
    win = np.concatenate([p[1] for p in parts])
    order = np.argsort(ts, kind="stable")
    ts, raw, win = ts[order], raw[order], win[order]
    keep = (win >= 0.5 * np.median(win)) & (win <= 1.5 * np.median(win))
    z = normalise(raw[keep], feats)
    cut = int(len(z) * 0.75)
    runs = []
    for d in args.run:
        rts, rwin, cols, _ = read_features(os.path.join(d, "features.csv"))
        ok = rwin >= 0.5 * card["window_s"]
        rts = rts[ok]
        rz = normalise(matrix({k: v[ok] for k, v in cols.items()}, names, len(rts)), feats)
        labels = read_run_labels(os.path.join(d, "labels.csv"))
        runs.append((rts, rz, labels))
    win_ms = int(round(card["window_s"] * 1000))
    k = card.get("raise_after", 2)
    rows = []
    for kind, h in [("dense", 1)] + [(kind, h) for h in args.history if h > 1 for kind in ("dense", "conv")]:
        tf.keras.utils.set_random_seed(SEED)
        x_fit, x_held = stacked(z[:cut], h), stacked(z[cut:], h)
        m = build_history(len(names), h, kind)
        m.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss="mse")
        vcut = int(len(x_fit) * 0.9)
        stop = tf.keras.callbacks.EarlyStopping(patience=30, restore_best_weights=True)
        m.fit(x_fit[:vcut], x_fit[:vcut], validation_data=(x_fit[vcut:], x_fit[vcut:]), epochs=EPOCHS,
              batch_size=32, shuffle=True, verbose=0, callbacks=[stop])

        def score(x):
            return scores_of(x, m.predict(x, verbose=0, batch_size=256))

        s_all = np.concatenate([score(x_fit), score(x_held)])
        s_held = s_all[len(x_fit):]
        runs_min = np.array([s_all[i:i + k].min() for i in range(len(s_all) - k + 1)])
        base = max(s_held.max(), runs_min.max())
        all_scores, all_truth, detected, delays = [], [], {}, []
        for rts, rz, labels in runs:
            sc = score(stacked(rz, h))
            t = rts[h - 1:]
            all_scores.append(sc)
            all_truth += window_truth(t, win_ms, labels)
            state = debounced(sc > base * card["margin"], k, args.clear_after)
            for a, b, f, _r in labels:
                idx = np.nonzero((t > a) & (t <= b + win_ms))[0]
                hit = next((j + 1 for j, i in enumerate(idx) if state[i]), None)
                detected.setdefault(f, []).append(hit)
                if hit:
                    delays.append(hit)
        sc = np.concatenate(all_scores)
        counted = np.array([x is not None for x in all_truth])
        positive = np.array([bool(x) for x in all_truth])
        _, _, auc = roc(sc[counted], positive[counted])
        c = confusion(debounced(sc > base * card["margin"], k, args.clear_after), all_truth)
        rows.append({"model": f"{kind}, {h} window(s)", "parameters": int(m.count_params()), "auc": auc,
                     "classes_detected": sum(1 for v in detected.values() if any(v)), "classes": len(detected),
                     "mean_delay": float(np.mean(delays)) if delays else float("nan"), **c})
        print(rows[-1])
    lines = ["# Models over a history of windows", "",
             f"Trained on {', '.join(os.path.basename(p) for p in args.normal)} with the features and normalisation of"
             f" {card['name']} ({len(names)} features), seed {SEED}; each threshold by the card's rule (margin"
             f" {card['margin']:g} x the larger of the held-out maximum and the highest score {k} consecutive normal"
             f" windows reached); scored on {', '.join(os.path.basename(os.path.normpath(d)) for d in args.run)} with"
             f" the agent's debounce (raise after {k}, clear after {args.clear_after}). Point-wise over the windows"
             " that count (docs/model.md).", "",
             "| model | parameters | ROC AUC | fault classes detected | mean windows to detect | F1 | FAR | MAR |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['parameters']} | {r['auc']:.4f} | {r['classes_detected']} of {r['classes']} |"
                     f" {r['mean_delay']:.2f} | {r['f1']:.3f} | {100 * r['far']:.2f} % | {100 * r['mar']:.2f} % |")
    text = "\n".join(lines) + "\n"
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


def sign(args):
    """Signs the card (Ed25519, openssl) and writes the MQTT model message
    (docs/model.md, "Updates"): DIR/anomaly.card.json.sig, DIR/model.bundle."""
    import struct
    import subprocess

    card_path = os.path.join(args.model, "anomaly.card.json")
    card, tfl = load_model(args.model)
    sig_path = card_path + ".sig"
    r = subprocess.run(["openssl", "pkeyutl", "-sign", "-rawin", "-inkey", args.key, "-in", card_path, "-out", sig_path],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"openssl could not sign with {args.key}: {r.stderr.strip()} "
                 "(an Ed25519 key: openssl genpkey -algorithm ed25519 -out KEY.pem)")
    with open(card_path, "rb") as f:
        card_bytes = f.read()
    with open(sig_path, "rb") as f:
        sig = f.read()
    bundle = b"EDGE-MODEL-1\n" + b"".join(struct.pack(">I", len(p)) + p for p in (card_bytes, sig, tfl))
    out = os.path.join(args.model, "model.bundle")
    with open(out, "wb") as f:
        f.write(bundle)
    print(f"wrote {sig_path} and {out} ({len(bundle)} bytes): publish it retained to <prefix>/<device>/model, "
          "or copy the card, its .sig and the .tflite into the device's drop directory")


def bench(args):
    """The reference interpreter's time per window on the model's golden
    inputs: the model alone (set input, invoke, get output) and the whole
    window (normalise, model, score). Medians of repeated loops, in us."""
    import time

    card, tfl = load_model(args.model)
    ref = Reference(tfl)
    it, inp, out = ref.it, ref.inp["index"], ref.out["index"]
    raws = [np.array(g["raw"]) for g in card["golden"]]
    zs = [np.array(g["input"], dtype=np.float32).reshape(1, -1) for g in card["golden"]]

    def model_only():
        for z in zs:
            it.set_tensor(inp, z)
            it.invoke()
            it.get_tensor(out)

    def window():
        for r in raws:
            z = normalise(r.reshape(1, -1), card["features"])
            it.set_tensor(inp, z)
            it.invoke()
            scores_of(z, it.get_tensor(out))

    res = {}
    for name, f in (("model_us", model_only), ("window_us", window)):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for _ in range(args.n):
                f()
            times.append((time.perf_counter() - t0) / (args.n * len(zs)) * 1e6)
        res[name] = float(np.median(times))
    import ai_edge_litert
    res["interpreter"] = f"ai-edge-litert {getattr(ai_edge_litert, '__version__', '2.3.0')} (Python)"
    print(json.dumps(res))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train, calibrate, convert, write the card")
    t.add_argument("--out", required=True)
    t.add_argument("--normal", nargs="+", required=True, help="features CSVs of normal activity")
    t.add_argument("--eval", nargs="*", help="scenario run directories (features.csv, labels.csv)")
    t.add_argument("--name", default="edge-anomaly")
    t.add_argument("--margin", type=float, default=1.5)
    t.add_argument("--raise-after", type=int, default=2, help="the agent's detect.raise_after the threshold is for")
    t.add_argument("--warn-margin", type=float, default=1.1,
                   help="the warn level's margin (0: no warn level); below --margin: warns before it stops")
    t.add_argument("--warn-raise-after", type=int, default=2, help="the agent's detect.warn_raise_after")
    t.add_argument("--reproducible", action="store_true", help="date the card by its data, not by now")
    t.add_argument("--exclude", default=r"\{other\}$",
                   help="features left out (regex on names; default: the `other` port class; '' keeps all)")
    t.add_argument("--include", default="",
                   help="only the features whose names match (regex; default: all), before --exclude")
    t.add_argument("--about", default="", help="how the training data was recorded (into the model card)")
    e = sub.add_parser("evaluate", help="score labelled scenario runs with a model")
    e.add_argument("--model", required=True)
    e.add_argument("--run", nargs="+", required=True)
    e.add_argument("--out")
    r = sub.add_parser("report", help="plots and operating points of a scenario run, from the agent's scores")
    r.add_argument("--model", required=True, help="the model card (anomaly.card.json) the run used")
    r.add_argument("--run", required=True, help="a `scenarios pump-evaluate` directory (samples.csv, labels.csv)")
    r.add_argument("--out", help="default: the run directory")
    r.add_argument("--clear-after", type=int, default=3, help="the agent's detect.clear_after")
    r.add_argument("--warn-clear-after", type=int, default=3, help="the agent's detect.warn_clear_after")
    c = sub.add_parser("compare", help="models over a history of windows against the one-window model")
    c.add_argument("--model", required=True, help="the one-window model's directory (its features and rule)")
    c.add_argument("--normal", nargs="+", required=True, help="the features CSVs it was trained on")
    c.add_argument("--run", nargs="+", required=True, help="labelled `scenarios pump-evaluate` directories")
    c.add_argument("--history", nargs="+", type=int, default=[3, 5], help="history lengths, windows")
    c.add_argument("--clear-after", type=int, default=3)
    c.add_argument("--out", help="write the table here (markdown)")
    g = sub.add_parser("sign", help="sign a model's card and write its MQTT model message")
    g.add_argument("--model", required=True)
    g.add_argument("--key", required=True, help="Ed25519 private key, PEM")
    b = sub.add_parser("bench", help="the reference interpreter's time per window (for the agent's benchmark)")
    b.add_argument("--model", required=True)
    b.add_argument("--n", type=int, default=2000)
    b.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    {"train": train, "evaluate": evaluate, "report": report, "compare": compare, "sign": sign, "bench": bench}[args.cmd](args)


if __name__ == "__main__":
    main()
