"""The convergence chart of one run, as a hand-written SVG (no plotting dependency).

Top panel: per round, the memory the collect found dirty and the bytes sent (MB, bars).
Bottom panel: the bytes still to send at each collect over time since the migration started,
with the downtime (pause to verified) shaded and labelled.
"""

from __future__ import annotations

import math
from html import escape
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .runner import RunResult

W, H = 760, 520
LEFT, RIGHT = 70, 20
TOP1, BOT1 = 50, 230          # bar panel
TOP2, BOT2 = 300, 470         # time panel
DIRTY, SENT, REMAIN, DOWN = "#e07b39", "#3a78b5", "#2a9d55", "#c0392b"
PAGE = 4096


def nice_ticks(vmax: float, n: int = 5) -> list[float]:
    """0, step, 2*step ... up to >= vmax, step one of 1, 2, 5 x 10^k."""
    if vmax <= 0:
        return [0.0, 1.0]
    raw = vmax / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    k = math.ceil(vmax / step - 1e-9)
    return [i * step for i in range(k + 1)]


def _fmt(v: float) -> str:
    return f"{v:.0f}" if v >= 10 or v == 0 else f"{v:.2g}"


def _text(x: float, y: float, s: str, size: int = 11, anchor: str = "middle", color: str = "#333",
          weight: str = "normal") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{color}" '
            f'font-weight="{weight}">{escape(s)}</text>')


def _yaxis(ticks: list[float], top: float, bottom: float, label: str) -> list[str]:
    out = []
    vmax = ticks[-1]
    for t in ticks:
        y = bottom - (bottom - top) * t / vmax
        out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{W - RIGHT}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(_text(LEFT - 6, y + 4, _fmt(t), anchor="end"))
    out.append(f'<text x="16" y="{(top + bottom) / 2:.1f}" font-size="11" text-anchor="middle" fill="#333" '
               f'transform="rotate(-90 16 {(top + bottom) / 2:.1f})">{escape(label)}</text>')
    out.append(f'<line x1="{LEFT}" y1="{bottom}" x2="{W - RIGHT}" y2="{bottom}" stroke="#888"/>')
    return out


def convergence_svg(name: str, run: "RunResult") -> str:
    """An SVG chart (str) of one run's convergence: the bytes still to send at each round's end
    over time, the downtime window shaded, events marked."""
    rep = run.report
    rounds = rep["per_round"]
    status = rep["status"]
    title = (f"{name} (run {run.repeat}): {status}, {len(rounds)} rounds, "
             + (f"downtime {rep['downtime_ms']:.0f} ms, " if status == "completed" else "")
             + f"{rep['transferred_bytes'] / 1e6:.1f} MB sent in {rep['total_time_ms'] / 1000:.2f} s")
    s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
         'font-family="sans-serif">', f'<rect width="{W}" height="{H}" fill="white"/>',
         _text(W / 2, 22, title, 13, weight="bold")]

    # --- top: dirtied and sent per round
    s.append(_text(LEFT, TOP1 - 10, "per round: dirty at the collect / sent (MB)", 11, "start"))
    dirty = [r["pages_dirtied"] * PAGE / 1e6 for r in rounds]
    sent = [r["bytes"] / 1e6 for r in rounds]
    ticks = nice_ticks(max(dirty + sent + [0.001]))
    s += _yaxis(ticks, TOP1, BOT1, "MB")
    n = max(len(rounds), 1)
    slot = (W - RIGHT - LEFT) / n
    bw = min(slot * 0.38, 40)
    for i, r in enumerate(rounds):
        x0 = LEFT + i * slot + slot / 2
        for j, (v, color) in enumerate(((dirty[i], DIRTY), (sent[i], SENT))):
            h = (BOT1 - TOP1) * v / ticks[-1]
            x = x0 - bw + j * bw
            s.append(f'<rect class="{"dirty" if j == 0 else "sent"}" x="{x:.1f}" y="{BOT1 - h:.1f}" '
                     f'width="{bw:.1f}" height="{max(h, 0.5):.1f}" fill="{color}"/>')
        label = "S&C" if r["stop_and_copy"] else str(r["round"])
        if n <= 40 or i % math.ceil(n / 40) == 0:
            s.append(_text(x0, BOT1 + 14, label, 10))
    lx = W - RIGHT - 200
    s += [f'<rect x="{lx}" y="{TOP1 - 20}" width="10" height="10" fill="{DIRTY}"/>',
          _text(lx + 14, TOP1 - 11, "dirty at collect", 10, "start"),
          f'<rect x="{lx + 105}" y="{TOP1 - 20}" width="10" height="10" fill="{SENT}"/>',
          _text(lx + 119, TOP1 - 11, "sent", 10, "start"),
          _text((LEFT + W - RIGHT) / 2, BOT1 + 28, "round (S&C = stop-and-copy)", 10)]

    # --- bottom: remaining over time, downtime shaded
    s.append(_text(LEFT, TOP2 - 10, "remaining to send at each collect (MB) over time", 11, "start"))
    pts = [(t["start_s"], t["remaining_bytes"] / 1e6) for t in run.timeline]
    end_s = rep["total_time_ms"] / 1000
    if run.downtime_window_s:
        pts.append((run.downtime_window_s[1], 0.0))
    tmax = max([end_s] + [p[0] for p in pts] + [0.001])
    xt = nice_ticks(tmax, 6)
    yt = nice_ticks(max([p[1] for p in pts] + [0.001]))
    s += _yaxis(yt, TOP2, BOT2, "MB")

    def X(t: float) -> float:
        return LEFT + (W - RIGHT - LEFT) * t / xt[-1]

    def Y(v: float) -> float:
        return BOT2 - (BOT2 - TOP2) * v / yt[-1]

    for t in xt:
        s.append(_text(X(t), BOT2 + 14, _fmt(t), 10))
    s.append(_text((LEFT + W - RIGHT) / 2, BOT2 + 30, "seconds since the migration started", 10))
    if run.downtime_window_s:
        a, b = run.downtime_window_s
        xa, xb = X(a), X(b)
        s.append(f'<rect class="downtime" x="{xa:.1f}" y="{TOP2}" width="{max(xb - xa, 2):.1f}" '
                 f'height="{BOT2 - TOP2}" fill="{DOWN}" fill-opacity="0.35"/>')
        right = xa > W / 2
        s.append(_text(xa - 4 if right else xb + 4, TOP2 + 12, f"downtime {rep['downtime_ms']:.0f} ms", 11,
                       "end" if right else "start", DOWN, "bold"))
    elif status != "completed":
        s.append(_text(W - RIGHT - 4, TOP2 + 12, f"{status}: no switch-over", 11, "end", DOWN, "bold"))
    if pts:
        path = " ".join(f"{X(t):.1f},{Y(v):.1f}" for t, v in pts)
        s.append(f'<polyline class="remaining" points="{path}" fill="none" stroke="{REMAIN}" stroke-width="2"/>')
        for t, v in pts:
            s.append(f'<circle cx="{X(t):.1f}" cy="{Y(v):.1f}" r="2.5" fill="{REMAIN}"/>')
    s.append("</svg>")
    return "\n".join(s) + "\n"
