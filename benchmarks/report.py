"""Benchmark figures, targets and the printed table (Markdown, so the docs page can take it as it is)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from measure import median, percentile


class BenchmarkError(RuntimeError):
    """A benchmark step did not do what the product promises; the message names the testrun."""


@dataclass
class Figure:
    """One row of the table: the samples of one scenario in one unit.

    With `higher_is_better` (rates) the p95 column shows the 5th percentile of
    the samples, the slow tail, so that p95 means "worse than median" in
    every row.
    """

    section: str
    name: str
    unit: str
    samples: list[float]
    higher_is_better: bool = False
    decimals: int = 1

    @property
    def median(self) -> float:
        return median(self.samples)

    @property
    def p95(self) -> float:
        return percentile(self.samples, 5 if self.higher_is_better else 95)

    def format(self, value: float) -> str:
        return f"{value:,.{self.decimals}f} {self.unit}"


@dataclass
class Target:
    """A goal for one figure or ratio, checked against its median."""

    description: str
    value: Callable[[], float | None]
    met: Callable[[float], bool]
    format: Callable[[float], str]


@dataclass
class Report:
    figures: list[Figure] = field(default_factory=list)
    ratios: list[tuple[str, float]] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        return figure

    def find(self, name: str) -> Figure | None:
        return next((figure for figure in self.figures if figure.name == name), None)

    def median_of(self, name: str) -> float | None:
        figure = self.find(name)
        return None if figure is None else figure.median

    def ratio(self, name: str) -> float | None:
        return next((value for ratio_name, value in self.ratios if ratio_name == name), None)

    def table(self) -> str:
        lines = [
            "| scenario | runs | median | p95 |",
            "|---|---:|---:|---:|",
        ]
        section = None
        # Sections are numbered, so sorting by section (a stable sort) keeps each section's rows in the order measured.
        for figure in sorted(self.figures, key=lambda figure: figure.section):
            if figure.section != section:
                section = figure.section
                lines.append(f"| **{section}** | | | |")
            lines.append(
                f"| {figure.name} | {len(figure.samples)} | {figure.format(figure.median)} | {figure.format(figure.p95)} |"
            )
        return "\n".join(lines)

    def ratio_lines(self) -> str:
        return "\n".join(f"- {name}: {value:.2f}" for name, value in self.ratios)

    def target_lines(self) -> str:
        lines = []
        for target in self.targets:
            value = target.value()
            if value is None:
                lines.append(f"- {target.description}: not measured")
                continue
            verdict = "met" if target.met(value) else "MISSED"
            lines.append(f"- {target.description}: {target.format(value)}, {verdict}")
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        return {
            "figures": [
                {"section": f.section, "name": f.name, "unit": f.unit, "median": f.median, "p95": f.p95, "samples": f.samples}
                for f in self.figures
            ],
            "ratios": dict(self.ratios),
            "details": self.details,
            "targets": [
                {"target": t.description, "value": t.value(), "met": None if t.value() is None else t.met(t.value())}
                for t in self.targets
            ],
        }
