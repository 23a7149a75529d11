"""Regenerate docs/benchmarks.md and its plots from bench/results/*.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.bytes import render as _bytes
from bench.common import RESULTS, ROOT
from bench.dedup_plan import render as _dedup
from bench.physical import PHYSICAL_PROFILE
from bench.scenarios import ratio

DOC = ROOT / "docs" / "benchmarks.md"
IMG = ROOT / "docs" / "img"


def _load() -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))}


def _ok(passed: bool) -> str:
    return "**met**" if passed else "**missed**"


def _bar_chart(name: str, labels: list[str], values: list[float], ylabel: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    IMG.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(labels, values, color="#4c72b0")
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", labelrotation=15, labelsize=8)
    fig.tight_layout()
    path = IMG / f"bench-{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"![{name}](img/{path.name})"


def _stall(r: dict[str, Any]) -> list[str]:
    p = r["params"]
    rows = [
        f"State {p['bytes'] / 1e6:.0f} MB of random float32; {p['steps']} steps of about "
        f"{p['step_ms']:.0f} ms compute; local period {p['local_period']}, durable period "
        f"{p['durable_period']}; {p['reps']} interleaved rounds, medians.",
        "",
        "| setup | wall (s) | overhead vs none (s) | median blocking per save (s) | steps at risk on a crash |",
        "|---|---|---|---|---|",
    ]
    names = {
        "none": "(a) no checkpointing",
        "orbax_durable_every_local": "(b) orbax, durable tier every local period",
        "orbax_durable_every_durable": "(c) orbax, durable tier every durable period",
        "orbax_local_async": "orbax local async only, zstd (orbax's default)",
        "orbax_local_async_no_zstd": "orbax local async only, uncompressed (tiered's default)",
        "tiered": "(d) tiered: local every period + daemon",
        "tiered_zstd": "(d') tiered with tiered.local_compression: true",
        "tiered_no_zstd": "(d') tiered with tiered.local_compression: false",
    }
    names = {k: v for k, v in names.items() if k in r["median_wall_s"]}
    for key, label in names.items():
        rows.append(
            f"| {label} | {r['median_wall_s'][key]:.2f} | {r['overhead_s'][key]:.2f} | "
            f"{r['median_save_block_s'][key]:.3f} | {r['steps_at_risk_on_crash'][key]} |"
        )
    over = r["overhead_s"]
    a = r["ratios"]["tiered_vs_orbax_local_async_overhead"]
    b = r["ratios"]["orbax_every_local_vs_tiered_overhead"]
    ref = r.get("reference", {"tiered": "orbax_local_async"})
    rows += [
        "",
        f"- tiered overhead / {names[ref['tiered']]} overhead (the same compression on both "
        f"sides): **{a:.2f}x** (bar: at most 1.1x) {_ok(a <= 1.1)}",
        f"- (b) overhead / tiered overhead: **{b:.1f}x** (bar: at least 5x) {_ok(b >= 5)}",
        *[
            f"- {names[k].split(' ', 1)[1]}: overhead / {names[ref.get(k, 'orbax_local_async')]} "
            f"**{ratio(over[k], over[ref.get(k, 'orbax_local_async')]):.2f}x**, (b) / its "
            f"overhead **{ratio(over['orbax_durable_every_local'], over[k]):.1f}x**"
            for k in names
            if k.startswith("tiered_")
        ],
        "- Overheads are paired by round (each run minus the same round's run without "
        "checkpointing), then the median; under 0.05 s they are floored to 0.05 s before taking "
        "ratios (noise).",
        *[f"- Failed run (left out of the medians): {f}" for f in r.get("failed_runs", [])],
        "",
        _bar_chart(
            "stall",
            [names[k].split(":")[0] for k in names],
            [r["overhead_s"][k] for k in names],
            "overhead vs (a), s",
        ),
    ]
    return rows


def _promote(res: dict[str, Any]) -> list[str]:
    rows = [
        "| backend | raw fsspec put (MB/s) | tiered promote, checksums included (MB/s) | ratio | bar 0.9x | median detection latency (s) | bar < 1 s |",
        "|---|---|---|---|---|---|---|",
    ]
    labels, values = [], []
    for backend, r in res.items():
        if not isinstance(r, dict) or "median" not in r:
            continue
        ratio = r["ratios"]["tiered_vs_raw_throughput"]
        lat = r["median_detection_latency_s"]
        lat_cells = f"{lat:.2f} | {_ok(lat < 1.0)}" if r["detection_latency_s"] else "- | -"
        rows.append(
            f"| {backend} | {r['median']['raw_put_mb_s']:.0f} | {r['median']['tiered_mb_s']:.0f} "
            f"| {ratio:.2f}x | {_ok(ratio >= 0.9)} | {lat_cells} |"
        )
        labels += [f"{backend} raw", f"{backend} tiered"]
        values += [r["median"]["raw_put_mb_s"], r["median"]["tiered_mb_s"]]
    first = next(v for v in res.values() if isinstance(v, dict) and "params" in v)
    rows.insert(
        0,
        f"One step of {first['params']['bytes'] / 1e6:.0f} MB, "
        f"{first['params']['reps']} interleaved rounds, medians. Detection latency: "
        "from orbax's commit to the daemon starting the upload. On `file://` both copies are "
        "timed until the bytes are on disk (tiered fsyncs each file before it commits; a bare "
        "put leaves them in the page cache, so the run ends with `sync`).\n",
    )
    rows += ["", _bar_chart("promote", labels, values, "MB/s")]
    return rows


def _restore(r: dict[str, Any]) -> list[str]:
    order = r["params"].get("order")
    med = r["median"]
    labels = {
        "orbax_direct": "orbax restoring straight from gs:// (tensorstore)",
        "tiered_store": "tiered, `durable_restore: store` (default): the store's crc32c of every "
        "object checked against the manifest, orbax reads in place, local copy after",
        "tiered_verify_first": "tiered, `durable_restore: verify_first`: download, verify every "
        "byte, restore locally",
    }

    def spread(key: str) -> str:
        return f"{min(r['times_s'][key]):.2f} to {max(r['times_s'][key]):.2f}"

    store = r["ratios"]["tiered_store_vs_orbax_direct_time"]
    first = r["ratios"]["tiered_verify_first_vs_orbax_direct_time"]
    return [
        f"A {r['params']['bytes'] / 1e6:.0f} MB step on the GCS emulator, restored onto an empty "
        f"node; {r['params']['reps']} rounds"
        + (f" ({order})" if order else "")
        + ", medians. Time until the state is in memory (the trainer can go on).",
        "",
        "| system | median time (s) | fastest, slowest (s) |",
        "|---|---|---|",
        *[f"| {labels[k]} | {med[k]:.2f} | {spread(k)} |" for k in labels],
        "",
        f"- store mode / orbax-direct: **{store:.2f}x** (bar: at most 1.1x) {_ok(store <= 1.1)}",
        f"- verify_first / orbax-direct: **{first:.2f}x** (no bar: the mode that reads every byte "
        "on this node before orbax sees it)",
        f"- In store mode the local copy was whole and verified {med['local_copy_filled_s']:.2f} s "
        "after the restore began (median), in the background.",
        "- What each mode guarantees: both load only a step whose every object matches the "
        "manifest. `store` takes the match from the checksum the store computed from the bytes "
        "it received (GCS); it does not catch a store that returns other bytes than it "
        "checksummed. `verify_first` checksums the bytes on this node's disk before orbax reads "
        "them, so it catches that too. Where the store keeps no checksum (`file://`, S3 as "
        "tiered uploads), `store` acts as `verify_first`.",
        "",
        _bar_chart(
            "restore",
            ["orbax direct", "tiered store", "tiered verify_first"],
            [med[k] for k in labels],
            "seconds",
        ),
    ]


def _interference(r: dict[str, Any]) -> list[str]:
    p = r["params"]
    names = {
        "default": "default (no cap: paced to the durable period)",
        "capped_400mbps": "capped at 50 MB/s (`upload_bandwidth_mb_per_s: 50`)",
        "uncapped": "unpaced (`transfer_pacing: null`)",
    }
    rows = [
        f"Compute steps of about {p['step_ms']:.0f} ms while the daemon (at its "
        f"default nice 10) uploads a {p['size_mb']} MB step to `file://`, from the "
        "upload's start to its commit (this machine has 2 cores).",
    ]
    if "durable_period" in p:
        rows[0] += (
            f" The step is periodic, with a durable period of {p['durable_period']} steps and "
            f"the trainer's step time ({p['recorded_seconds_per_step'] * 1000:.0f} ms) in its "
            f"metadata, as `tiered.CheckpointManager` records it: the next durable step is "
            f"{r['pacing']['seconds_to_next_durable_step']:.0f} s away, and the default pace "
            f"(half of that) is to finish in {r['pacing']['expected_upload_s']:.0f} s."
        )
    rows += [
        "",
        "| upload | median idle step (ms) | median step while uploading (ms) | slowdown "
        "| bar 1.05x | durable lag: upload start to commit (s) |",
        "|---|---|---|---|---|---|",
    ]
    if "durable_lag_median_s" in r:
        rows[0] += (
            " Busy and idle steps alternate in blocks of five, the daemon stopped (SIGSTOP) "
            "for the idle ones, so both see the same neighbours on a shared machine."
        )
    lag = r.get("durable_lag_median_s", {})
    for label, s in r["summary"].items():
        rows.append(
            f"| {names.get(label, label)} | {s['median_idle_s'] * 1000:.1f} "
            f"| {s['median_busy_s'] * 1000:.1f} | {s['slowdown']:.3f}x "
            f"| {_ok(s['slowdown'] <= 1.05)} | "
            + (f"{lag[label]:.1f}" if label in lag else "-")
            + " |"
        )
    return rows


def _footprint(r: dict[str, Any]) -> list[str]:
    p = r["params"]
    return [
        f"The daemon watching {p['steps']} steps x {p['files_per_step']} files, idle, "
        f"measured over {p['seconds']:.0f} s.",
        "",
        "| idle CPU | RSS |",
        "|---|---|",
        f"| {r['idle_cpu_percent']:.2f}% ({_ok(r['idle_cpu_percent'] < 1)}, bar < 1%) | "
        f"{r['rss_mb']:.0f} MB ({_ok(r['rss_mb'] < 150)}, bar < 150 MB) |",
        *_memory(r.get("memory")),
    ]


def _memory(m: dict[str, Any] | None) -> list[str]:
    """Peak RSS per backend and command, beside a plain fsspec copy of the same file."""
    if not m:
        return []
    rows = [
        "",
        f"Peak resident memory (MB) moving a step of one {m['params']['size_mb']} MB file: each "
        "`tiered` command as users run it, beside one plain fsspec `put_file` / `get_file` of "
        "the same file with the client's defaults. Bar: every `tiered` command under 200 MB.",
        "",
        "| backend | tiered promote | tiered verify | tiered restore | fsspec put | fsspec get | bar |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, p in m["peak_rss_mb"].items():
        worst = max(p["tiered_promote"], p["tiered_verify"], p["tiered_restore"])
        rows.append(
            f"| {name} | {p['tiered_promote']:.0f} | {p['tiered_verify']:.0f} | "
            f"{p['tiered_restore']:.0f} | {p['fsspec_put']:.0f} | {p['fsspec_get']:.0f} | "
            f"{_ok(worst < 200)} |"
        )
    return rows


def _physical(r: dict[str, Any]) -> list[str]:
    m, ratios = r["median"], r["ratios"]
    rows = [
        f"{r['params']['size_mb']} MB of random float32 in 8 arrays, {r['params']['reps']} "
        "interleaved rounds (the order rotating: dd, tiered's local save, the same save with "
        "orbax's default data file size), medians. Each save is timed to the end of a `sync` "
        "after it; `save()` is the part the training loop waits for.",
        "",
        "| writer | MB/s | fraction of dd | CPU (s) | `save()` returns (s) |",
        "|---|---|---|---|---|",
        f"| dd, direct I/O write | {m['dd_direct_write_mb_s']:.0f} | 1.00 | "
        f"{m.get('cpu_s', {}).get('dd', float('nan')):.2f} | - |",
        f"| tiered's local save (data files of `tiered.local_data_file_size`, 256 MiB) | "
        f"{m['orbax_local_save_mb_s']:.0f} | {ratios['local_save_fraction_of_disk']:.2f} | "
        f"{m.get('cpu_s', {}).get('tiered', float('nan')):.2f} | "
        f"{m.get('save_return_s', {}).get('tiered', float('nan')):.3f} |",
    ]
    if "orbax_default_files_mb_s" in m:
        rows.append(
            f"| the same save, orbax's default data file size (2 GiB) | "
            f"{m['orbax_default_files_mb_s']:.0f} | "
            f"{ratios['orbax_default_files_fraction_of_disk']:.2f} | "
            f"{m['cpu_s']['orbax_default']:.2f} | {m['save_return_s']['orbax_default']:.3f} |"
        )
    if "cheap_copy_mb_s" in m:
        cheap, dear = m["cheap_copy_mb_s"], m["dear_copy_mb_s"]
        rows += [
            "",
            f"The same rounds split by the save's CPU (below or above {m['cpu_split_s']:.2f} s, "
            "the median): tiered's save "
            f"{cheap['tiered']:.0f} MB/s where the copy into the page cache was cheap and "
            f"{dear['tiered']:.0f} where it was dear; with orbax's default file size "
            f"{cheap['orbax_default']:.0f} and {dear['orbax_default']:.0f}.",
        ]
    if "load_average" in r:
        before, after = r["load_average"]["before"][0], r["load_average"]["after"][0]
        rows += ["", f"Load average (1 min) {before:.1f} before, {after:.1f} after."]
    return [*rows, "", *PHYSICAL_PROFILE]


def _scaling(r: dict[str, Any]) -> list[str]:
    p = r["params"]

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    rows = [
        f"Weak scaling: each process holds {p['per_node_mb']} MB of random float32 (its rows of "
        "one sharded array), saves step 50 into its own local directory, and its own daemon "
        "uploads that node's part; node 0 commits. Then the last node is replaced by an empty "
        f"one and every process restores. All processes, daemons and the emulator share this "
        f"machine's {r['machine']['cpus']} cores; {p['reps']} rounds, medians.",
        "",
        "| processes | uploaded per node (MB) | first restore call, fresh start (s) | "
        "local save (s) | one node's part upload (s) | last local commit to durable commit (s) "
        "| restore, replaced node (s) | restore, other nodes (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, m in r["median"].items():
        part_bytes = [b for run in r["runs"][n] for b in run["part_bytes"] if b]
        per_node = sorted(part_bytes)[len(part_bytes) // 2] / 1e6 if part_bytes else None
        rows.append(
            f"| {n} | {f'{per_node:.0f}' if per_node else '-'} | "
            f"{f(m['agree_fresh_s'])} | {f(m['local_save_s'])} | "
            f"{f(m['part_upload_s'])} | {f(m['save_to_durable_s'])} | "
            f"{f(m['restore_replaced_s'])} | {f(m['restore_others_s'])} |"
        )
    rows += [
        "",
        "- What each node uploads stays the same as processes are added: its own part. Nothing "
        "of another node's crosses its link.",
        "- The first restore call with several processes includes the agreement through the "
        "durable tier (request, node 0's decision, poll); with one process there is none.",
        "- The last column is the same as the one before it because orbax's multi-process "
        "restore ends in a barrier: the nodes restoring from their own disks wait for the one "
        "downloading its part.",
        "- Times grow with N here because N processes, N daemons and the one emulator process "
        "share 2 cores and one disk; on a cluster each node brings its own.",
    ]
    return rows


def _peers(r: dict[str, Any]) -> list[str]:
    rs, it = r["restore"], r["interference"]
    size = rs["params"]["size_mb"]
    rows = [
        f"A replaced node restores its {size} MB part of the newest step: from the peer that "
        "kept a copy (a real daemon's peer server on loopback, every file checked against the "
        "owner-signed manifest) against the same step from the durable tier (the GCS "
        "emulator, every file checked). Both end with a verified local step. "
        f"{rs['params']['reps']} rounds, order alternating.",
        "",
        "| source | median (s) | runs (s) |",
        "|---|---|---|",
    ]
    for key, label in (("from_peer", "peer"), ("from_durable", "durable tier")):
        runs = ", ".join(f"{t:.2f}" for t in rs["times_s"][key])
        rows.append(f"| {label} | {rs['median'][key]:.2f} | {runs} |")
    rows += [
        "",
        f"Peer / durable time: **{rs['ratios']['peer_vs_durable_time']:.2f}x**. A peer copy "
        "also needs no durable step at all: it is the newest local step, up to a durable "
        "period newer.",
        "",
        f"Compute steps of about {it['params']['step_ms']:.0f} ms while one daemon sends a "
        f"{it['params']['size_mb']} MB step to another (both at nice 10, both on this "
        "machine's 2 cores, so the receiver's checksumming competes too), from the first "
        "bytes at the receiver to the copy being complete.",
        "",
        "| replication | median idle step (ms) | median step while replicating (ms) | slowdown |",
        "|---|---|---|---|",
    ]
    for label, s in it["summary"].items():
        rows.append(
            f"| {label} | {s['median_idle_s'] * 1000:.1f} | {s['median_busy_s'] * 1000:.1f} "
            f"| {s['slowdown']:.3f}x |"
        )
    return rows


def _hashing(r: dict[str, Any]) -> list[str]:
    p, rates = r["params"], r["digest_gb_s"]
    rows = [
        f"One step of {p['bytes'] / 1e6:.0f} MB (random float32, OCDBT), promoted with the "
        "manifest's two checksums (crc32c and xxh3-128, tiered today) and with crc32c alone "
        "(the same code, `Digest` feeding the crc32c only: tiered before the xxh3); "
        f"{p['reps']} interleaved rounds, medians. On `file://` a promotion checksums every "
        "byte twice (the manifest, then the copy); on `gs://` once (the manifest: GCS's crc32c "
        "checks the upload, and only the few small OCDBT files are read back).",
        "",
        "| backend | crc32c alone (MB/s) | crc32c + xxh3 (MB/s) | ratio | bar 0.95x "
        "| CPU s per promotion, crc32c alone | CPU s, crc32c + xxh3 |",
        "|---|---|---|---|---|---|---|",
    ]
    for backend in ("file", "gs"):
        b = r.get(backend)
        if not b:
            continue
        med, ratio, cpu = b["median_mb_s"], b["ratio_new_vs_old"], b["median_cpu_s"]
        rows.append(
            f"| {backend} | {med['crc32c_only']:.0f} | {med['crc32c_xxh3']:.0f} | "
            f"{ratio:.3f}x | {_ok(ratio >= 0.95)} | {cpu['crc32c_only']:.2f} | "
            f"{cpu['crc32c_xxh3']:.2f} |"
        )
    load = r.get("load_average", {})
    rows += [
        "",
        f"One thread over bytes in memory: crc32c {rates['crc32c']:.1f} GB/s, xxh3-128 "
        f"{rates['xxh3_128']:.1f} GB/s: one xxh3 pass over the step costs "
        f"{p['bytes'] / 1e9 / rates['xxh3_128']:.3f} s of CPU.",
    ]
    if load:
        rows += [
            "",
            f"Load average {load['before']:.1f} before the run and {load['after']:.1f} after, "
            f"on {r['machine']['cpus']} CPUs shared with other work: single promotions vary by "
            "more than the difference measured, so the medians of interleaved rounds and the "
            "CPU seconds are the numbers to read.",
        ]
    return rows


def _scale(r: dict[str, Any]) -> list[str]:
    rows = r["rows"]
    backends = [b for b in ("file", "gs") if b in rows[0]]
    out = [
        "One durable step through N simulated nodes, each the daemon's own code over its own "
        "rank (`bench/scale.py`): every node uploads its part and part marker, node 0 tries the "
        f"commit once every {r['params']['commit_poll_s']:.0f} s as its daemon does (the OCDBT "
        "merge of N databases included), every node lists the tier once, then a restore "
        "agreement of all N, then node 0 prunes the step. Node 0 runs in a process of its "
        "own; the others are threads of the bench. Store requests are calls that reach the "
        "store, counted per node (each node's filesystem wrapped); on the GCS emulator, HTTP "
        "requests are also counted at the server (every node's and the merge child's).",
        "",
    ]
    names = {"file": "`file://`", "gs": "GCS emulator"}
    for b in backends:
        out += [
            f"**{names[b]}**",
            "",
            "| nodes | last part marker to commit (s) | commit call (s) | merge (s) | merge peak "
            "RSS (MB) | node 0 peak RSS (MB) | requests/step, node 0 | requests/step, other "
            "node (max) | restore agreement (s) | agreement requests, node 0 / other (max) | "
            "prune (s) |" + (" HTTP requests/step, all nodes |" if b == "gs" else ""),
            "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if b == "gs" else ""),
        ]
        for row in rows:
            x = row[b]
            out.append(
                f"| {row['nodes']} | {x['last_part_to_commit_s']:.2f} | {x['commit_call_s']:.2f}"
                f" | {x['merge_s']:.2f} | {x['merge_peak_rss_mb']:.0f} | "
                f"{x['node0_peak_rss_mb']:.0f} | {x['requests_node0_per_step']} | "
                f"{x['requests_per_other_node_per_step']['max']} | {x['agreement_s']:.2f} | "
                f"{x['requests_node0_agreement']} / "
                f"{x['requests_per_other_node_agreement']['max']} | {x['prune_s']:.2f} |"
                + (f" {x['http_requests_per_step']} |" if b == "gs" else "")
            )
        out.append("")
    return out


def _goodput(r: dict[str, Any]) -> list[str]:
    from bench import goodput

    return goodput.render(r, img=IMG)


SECTIONS = [
    ("stall", "1. Training stall", _stall),
    ("stall-gpu", "1b. Training stall, state on the GPU (device-to-host copy included)", _stall),
    ("promote", "2. Promotion throughput", _promote),
    ("restore", "3. Fresh-node restore", _restore),
    ("interference", "4. Interference with training", _interference),
    ("footprint", "5. Daemon footprint", _footprint),
    ("physical", "6. The physical limit", _physical),
    ("scaling", "7. Several processes: per-node parts, one commit", _scaling),
    ("peers", "8. Peer replication: a lost node, and training while replicating", _peers),
    ("hashing", "9. The manifest's second checksum (xxh3) against crc32c alone", _hashing),
    ("scale", "10. The multi-node protocol at 16 to 1,024 nodes", _scale),
    ("goodput", "11. Goodput through a failure trace", _goodput),
    ("bytes", "12. Bytes per step and per restore: tiered against orbax's global save", _bytes),
    ("dedup", "13. The dedup's planning at 16 to 1,024 nodes", _dedup),
]


def write() -> Path:
    results = _load()
    lines = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`python -m bench`) from `bench/results/*.json`; every "
        "number below comes from a real run on the machine named in each section. Each "
        "scenario runs the systems it compares in the same process run, interleaved, and "
        "reports medians and ratios. The durable tier is gcp-storage-emulator on loopback "
        "(in memory, started through tests/gcs_emulator.py, which makes its multipart parsing "
        "and object generations behave as GCS does), with `file://` as the second backend.",
        "",
    ]
    for key, title, render in SECTIONS:
        lines.append(f"## {title}")
        lines.append("")
        r = results.get(key)
        if r is None:
            hint = (
                "needs a GPU: run `python -m bench stall` on a machine with one"
                if key.endswith("-gpu")
                else f"`python -m bench {key}`"
            )
            lines += [f"Not run yet: {hint}.", ""]
            continue
        lines.append(
            f"Command: `{r['command']}` on {r['machine']['cpus']} CPUs, {r['machine']['date']}."
        )
        lines.append("")
        lines += render(r)
        lines.append("")
    notes = ROOT / "bench" / "NOTES.md"
    if notes.exists():
        lines += [notes.read_text()]
    DOC.write_text("\n".join(lines).rstrip() + "\n")
    return DOC
