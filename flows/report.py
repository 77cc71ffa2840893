"""The demo's report: one self-contained HTML page (charts inline, videos beside it)."""

from __future__ import annotations

import html
import json

from flows.charts import bar_chart, data_url, line_chart


def _table(rows: dict) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows.items())
    return f"<table>{cells}</table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, default=str)[:300]
    return str(v)


def write_report(path: str, metrics: dict, samples: list[dict], losses: list[float]) -> None:
    ev = metrics.get("eval", {})
    acc = ev.get("accuracy", {})
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>sora-ray demo report</title>",
        "<style>body{font-family:sans-serif;margin:2em;background:#fafafa;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:left}"
        ".grid{display:flex;flex-wrap:wrap;gap:16px}.card{background:white;border:1px solid #ddd;padding:8px}"
        ".card img,.card video{display:block;max-width:280px;image-rendering:pixelated;min-width:200px}"
        "h1{color:#1f4e79}</style></head><body>",
        "<h1>sora-ray demo report</h1>",
        f"<p>The whole system on the shapes world, in {metrics.get('total_minutes')} minutes.</p>",
        "<h2>Prompt adherence on held-out attribute combinations</h2>",
        _table({**{f"{k} accuracy": v for k, v in acc.items()}, "size correct": ev.get("size_correct"),
                "frame count correct": ev.get("frames_correct"), "prompts": ev.get("n")}),
    ]
    drafts = metrics.get("eval_draft", {})
    if drafts:
        parts += ["<h3>Drafts at the trained sizes refined at twice them: does the refined video keep the "
                  "draft's attributes?</h3>",
                  _table({**{f"{k} same as the draft": v for k, v in drafts.get("draft_agreement", {}).items()},
                          **{f"refined {k} accuracy": v for k, v in drafts.get("accuracy", {}).items()},
                          "prompts": drafts.get("n")})]
    parts.append("<h2>Samples</h2><div class='grid'>")
    for s in samples:
        parts.append(
            f"<div class='card'><b>{html.escape(s['title'])}</b><br><small>{html.escape(s['prompt'])}</small>"
            f"<img src='{html.escape(s['preview'])}' alt='{html.escape(s['title'])}'>"
            f"<video src='{html.escape(s['video'])}' controls loop muted></video>"
            f"<small>{'x'.join(str(v) for v in s['shape'][:3])} (frames x height x width)</small></div>")
    parts.append("</div>")
    parts.append("<h2>Training</h2>")
    parts.append(f"<img src='{data_url(line_chart({'DiT loss': losses}, 'DiT flow-matching loss', log_y=True))}'>")
    parts.append(_table({"VAE held-out PSNR (dB)": metrics.get("vae", {}).get("heldout_psnr_db"),
                         "VAE steps": metrics.get("vae", {}).get("steps"),
                         "DiT steps": metrics.get("dit", {}).get("steps"),
                         "DiT final loss": metrics.get("dit", {}).get("final_loss")}))
    cap = metrics.get("captioner", {})
    parts.append("<h2>Captioner (trained on ground-truth captions, scored on held-out clips)</h2>")
    parts.append(_table({f"{k} accuracy": v for k, v in cap.get("accuracy", {}).items()}))
    for ex in cap.get("examples", []):
        parts.append(f"<p><small>truth: {html.escape(ex['truth'])}<br>ours: {html.escape(ex['caption'])}</small></p>")
    buckets = metrics.get("ingest", {}).get("buckets", {})
    parts.append("<h2>Data</h2>")
    parts.append(f"<img src='{data_url(bar_chart(buckets, 'clips per bucket'))}'>")
    parts.append(_table({"clips": metrics.get("ingest", {}).get("clips"),
                         "quarantined": metrics.get("ingest", {}).get("quarantine_rows"),
                         **{f"time: {k} (s)": v for k, v in metrics.get("timings_s", {}).items()}}))
    parts.append("</body></html>")
    with open(path, "w") as f:
        f.write("\n".join(parts))
