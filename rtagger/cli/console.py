"""Terminal view of live tag updates (``rtagger listen`` and ``rtagger stream``)."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text


class LiveView:
    """Keeps the newest state of one stream from protocol messages; renders it with rich."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.last: dict | None = None
        self.segments: list[dict] = []
        self.final: dict | None = None
        self.trained = True
        self.extra: dict[str, str] = {}  # e.g. sound-card overruns

    def __call__(self, msg: dict) -> None:
        kind = msg["type"]
        if kind == "update":
            self.last = msg
        elif kind == "segment":
            self.segments.append(msg)
        elif kind == "final":
            self.final = msg
        elif kind == "started":
            self.trained = msg["model"].get("trained", True)

    def render(self) -> Group:
        head = Text(self.title, style="bold")
        if not self.trained:
            head.append("  UNTRAINED model: scores, not tags", style="yellow")
        if self.last is None:
            return Group(head, Text("waiting for the first 3.69 s window...", style="dim"))
        u = self.last
        table = Table(show_header=True, header_style="bold", expand=False)
        table.add_column(f"track tags (segment {u['segment']})")
        table.add_column("prob", justify="right")
        table.add_column("latest window", style="dim")
        table.add_column("prob", justify="right", style="dim")
        committed = set(u["committed"])
        rows = max(len(u["track"]), len(u["window"]["top"]))
        for i in range(rows):
            t = u["track"][i] if i < len(u["track"]) else ["", ""]
            w = u["window"]["top"][i] if i < len(u["window"]["top"]) else ["", ""]
            name = Text(t[0], style="bold green" if t[0] in committed else "")
            table.add_row(name, f"{t[1]:.2f}" if t[1] != "" else "", w[0],
                          f"{w[1]:.2f}" if w[1] != "" else "")
        status = (f"t={u['window']['end_s']:.1f} s  window {u['window']['index']}  "
                  f"latency {u['latency_ms']:.0f} ms  dropped {u['dropped']}"
                  + "".join(f"  {k} {v}" for k, v in self.extra.items())
                  + ("  (provisional)" if u["provisional"] else ""))
        return Group(head, table, Text(status, style="dim"))
