"""`pipeline plan`: what a run of each manifest would do and cost, before paying anything.

For each item, compared with the lineage database and the storage:
- new: its id was never run for this manifest name;
- changed: same id, another item key (prompt, seed, params, inputs or recipe changed);
- unchanged: same item key, outputs stored and verified: the run would skip it;
- rerun: same item key, but its outputs are not all stored (it failed, or was deleted);
- removed: in the newest run of this manifest name, no longer in the file.

For an item that would run, each node (the generation, then each recipe step on each
output) is either reused (its node key succeeded before: born succeeded, nothing paid, see
`Repository.record_run`) or run. A step's key hashes its parent's output asset id, so it is
known exactly when the parent is reused; a step under a node that would run is priced by
dry-running it on an asset we have (an input or an earlier output: "estimated"), or, with
no such asset, left "priced at run time". Prices come from dryRun (HTTP 269), cached by node
key for the process; nothing is paid or recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from pipeline import budget
from pipeline.errors import ApiPermanentError
from pipeline.keys import compute_step_key
from pipeline.manifest import ItemSpec, Manifest, StepSpec
from pipeline.models import ItemRow, ManifestRow, NodeRow, RunRow
from pipeline.nodes import NodeState
from pipeline.stages import Context

EXACT, ESTIMATED, AT_RUN_TIME = "exact", "estimated", "at run time"
_by_node_key: dict[str, float] = {}  # node key -> CU (dry runs are cached for the process)


@dataclass
class StepPlan:
    """One level of an item's recipe: how many nodes are reused or run, and their cost."""

    step: int
    model: str
    endpoint: str
    reused: int = 0
    run: int = 0
    creative_units: float = 0.0
    priced: dict[str, int] = field(default_factory=dict)  # exact/estimated/at run time -> n

    def add_run(self, cost: float | None, how: str) -> None:
        self.run += 1
        self.priced[how] = self.priced.get(how, 0) + 1
        if cost is not None:
            self.creative_units += cost

    def doc(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": self.model,
            "endpoint": self.endpoint,
            "reused": self.reused,
            "run": self.run,
            "creative_units": round(self.creative_units, 4),
            "priced": self.priced,
        }


class Planner:
    """Plans manifests on an Executor's context (repository, client, storage)."""

    def __init__(self, ctx: Context, asset_ids: dict[str, str]) -> None:
        self.ctx = ctx
        self.asset_ids = asset_ids  # input sha256 -> uploaded asset id
        self.problems: list[str] = []
        self.sample_asset: str | None = next(iter(asset_ids.values()), None)

    # -- prices ----------------------------------------------------------------------
    def price(self, node_key: str | None, model: str, endpoint: str, body: dict[str, Any]) -> float:
        if node_key is not None and node_key in _by_node_key:
            return _by_node_key[node_key]
        cost = budget.price(self.ctx, model, endpoint, body)
        if node_key is not None:
            _by_node_key[node_key] = cost
        return cost

    # -- plan ------------------------------------------------------------------------
    def plan(self, manifest: Manifest) -> dict[str, Any]:
        repo = self.ctx.repo
        history, last_ids = self._history(manifest.name)
        stored = repo.find_stored_outputs(i.item_key for i in manifest.items)
        with repo.session() as s:
            generation = repo._reusable(s, [i.generation_key for i in manifest.items])
        if self.sample_asset is None:
            self.sample_asset = next((ids[0] for _, ids in generation.values()), None)
        if self.sample_asset is None:
            self.sample_asset = self._any_output()
        items: list[dict[str, Any]] = []
        for n, spec in enumerate(manifest.items):
            outputs = stored.get(spec.item_key)
            skipped = bool(outputs) and all(
                o.key == manifest.output_key(spec, o.index, o.key.rpartition(".")[2])
                and self.ctx.storage.verify(o.key, o.sha256)
                for o in outputs or []
            )
            if spec.id not in history:
                status = "new"
            elif history[spec.id] != spec.item_key:
                status = "changed"
            else:
                status = "unchanged" if skipped else "rerun"
            steps = [] if skipped else self._nodes(manifest, n, spec, generation)
            items.append(
                {
                    "id": spec.id,
                    "line": spec.line,
                    "status": status,
                    "item_key": spec.item_key,
                    "would_run": not skipped,
                    "steps": [s.doc() for s in steps],
                    "creative_units": round(sum(s.creative_units for s in steps), 4),
                    "priced_at_run_time": sum(s.priced.get(AT_RUN_TIME, 0) for s in steps),
                }
            )
        present = {spec.id for spec in manifest.items}
        for removed in sorted(last_ids - present):
            items.append(
                {
                    "id": removed,
                    "line": None,
                    "status": "removed",
                    "item_key": None,
                    "would_run": False,
                    "steps": [],
                    "creative_units": 0.0,
                    "priced_at_run_time": 0,
                }
            )
        counts = {k: 0 for k in ("new", "changed", "unchanged", "rerun", "removed")}
        for item in items:
            counts[item["status"]] += 1
        return {
            "manifest": manifest.name,
            "path": str(manifest.path),
            "budget": manifest.budget,
            "counts": counts,
            "items": items,
            "creative_units": round(sum(i["creative_units"] for i in items), 4),
            "priced_at_run_time": sum(i["priced_at_run_time"] for i in items),
        }

    def _nodes(
        self,
        manifest: Manifest,
        n: int,
        spec: ItemSpec,
        generation: dict[str, tuple[int, list[str]]],
    ) -> list[StepPlan]:
        """Per recipe level: which nodes of the item would be reused and which run."""
        level = StepPlan(0, manifest.model, spec.endpoint)
        reused = generation.get(spec.generation_key)
        known: list[str] = []  # outputs of reused nodes: their children's keys are known
        unknown = 0  # outputs of nodes that would run: unknown until they do
        if reused:
            level.reused = 1
            known = list(reused[1])
        else:
            try:
                body = spec.request_body(manifest, self.asset_ids)
                cost = self.price(spec.generation_key, manifest.model, spec.endpoint, body)
                level.add_run(cost, EXACT)
            except ApiPermanentError as exc:
                self._problem(manifest, spec, f"items[{n}]", exc)
                level.add_run(None, AT_RUN_TIME)
            unknown = spec.generation_outputs
        levels = [level]
        for number, step in enumerate(spec.steps, start=1):
            level = StepPlan(number, step.model, step.endpoint)
            keys = {asset: _step_key(step, asset) for asset in known}
            with self.ctx.repo.session() as s:
                found = self.ctx.repo._reusable(s, list(keys.values()))
            next_known: list[str] = []
            runs = 0
            for asset, key in keys.items():
                if key in found:
                    level.reused += 1
                    next_known += found[key][1]
                    continue
                runs += 1
                try:
                    cost = self.price(key, step.model, step.endpoint, step.request_body(asset))
                    level.add_run(cost, EXACT)
                except ApiPermanentError as exc:
                    self._problem(manifest, spec, f"items[{n}].steps[{number - 1}]", exc)
                    level.add_run(None, AT_RUN_TIME)
            for _ in range(unknown):
                estimate, how = self._estimate(step)
                level.add_run(estimate, how)
            unknown = (runs + unknown) * step.expected_outputs
            known = next_known
            levels.append(level)
        return levels

    def _estimate(self, step: StepSpec) -> tuple[float | None, str]:
        """A step whose input does not exist yet, priced on an asset we have (if any)."""
        if self.sample_asset is None:
            return None, AT_RUN_TIME
        try:
            body = step.request_body(self.sample_asset)
            return self.price(None, step.model, step.endpoint, body), ESTIMATED
        except ApiPermanentError:
            return None, AT_RUN_TIME

    def _problem(self, manifest: Manifest, spec: ItemSpec, fld: str, exc: Exception) -> None:
        self.problems.append(f"{manifest.path}:{spec.line}: {fld}: the dry run failed: {exc}")

    def _history(self, name: str) -> tuple[dict[str, str], set[str]]:
        """The newest item key of every item id run for this manifest name; the newest
        run's item ids."""
        newest: dict[str, str] = {}
        last: set[str] = set()
        with self.ctx.repo.session() as s:
            rows = s.execute(
                select(ItemRow.manifest_item_id, ItemRow.item_key, ItemRow.run_id)
                .join(RunRow, ItemRow.run_id == RunRow.id)
                .join(ManifestRow, RunRow.manifest_id == ManifestRow.id)
                .where(ManifestRow.name == name)
                .order_by(RunRow.created_at.desc(), RunRow.id.desc(), ItemRow.id.desc())
            ).all()
        last_run = rows[0][2] if rows else None
        for item_id, item_key, run_id in rows:
            newest.setdefault(item_id, item_key)
            if run_id == last_run:
                last.add(item_id)
        return newest, last

    def _any_output(self) -> str | None:
        """Some asset id an earlier run produced (to price steps whose input is unknown)."""
        with self.ctx.repo.session() as s:
            outputs = s.execute(
                select(NodeRow.outputs)
                .where(NodeRow.state == NodeState.SUCCEEDED, NodeRow.outputs.is_not(None))
                .order_by(NodeRow.id.desc())
                .limit(1)
            ).scalar()
        ids = (outputs or {}).get("ids") or []
        return str(ids[0]) if ids else None


def _step_key(step: StepSpec, asset: str) -> str:
    return compute_step_key(
        model=step.model,
        endpoint=step.endpoint,
        params=step.params,
        prompt=step.prompt,
        input_asset=asset,
    )


def summarize(plans: list[dict[str, Any]]) -> dict[str, Any]:
    """The one --json document of `pipeline plan`."""
    counts: dict[str, int] = {}
    for plan in plans:
        for key, value in plan["counts"].items():
            counts[key] = counts.get(key, 0) + value
    return {
        "manifests": plans,
        "counts": counts,
        "creative_units": round(sum(p["creative_units"] for p in plans), 4),
        "priced_at_run_time": sum(p["priced_at_run_time"] for p in plans),
    }


def _runs(item: dict[str, Any]) -> str:
    parts = []
    for s in item["steps"]:
        label = "generation" if s["step"] == 0 else f"step {s['step']} {s['model']}"
        if s["run"]:
            priced = {k: v for k, v in s["priced"].items() if k != EXACT}
            note = ", ".join(f"{v} {k}" for k, v in priced.items())
            parts.append(f"{label}: run {s['run']}" + (f" ({note})" if note else ""))
        elif s["reused"]:
            parts.append(f"{label}: reused {s['reused']}")
    return "; ".join(parts) if parts else ("skipped" if item["status"] == "unchanged" else "—")


def _cost(value: float, unpriced: int) -> str:
    text = f"{value:g}"
    return text + (f" + {unpriced} at run time" if unpriced else "")


def markdown(doc: dict[str, Any]) -> str:
    """A pull-request comment."""
    lines = ["## Pipeline plan", ""]
    for plan in doc["manifests"]:
        c = plan["counts"]
        lines += [
            f"### `{plan['manifest']}` · "
            f"{_cost(plan['creative_units'], plan['priced_at_run_time'])} CU",
            "",
            f"{c['new']} new · {c['changed']} changed · {c['unchanged']} unchanged · "
            f"{c['rerun']} to re-run · {c['removed']} removed"
            + (f" · budget {plan['budget']:g} CU" if plan.get("budget") else ""),
            "",
            "| item | status | what runs | CU |",
            "|---|---|---|---:|",
        ]
        for item in plan["items"]:
            lines.append(
                f"| `{item['id']}` | {item['status']} | {_runs(item)} | "
                f"{_cost(item['creative_units'], item['priced_at_run_time'])} |"
            )
        lines.append("")
    lines.append(
        f"**Total: {_cost(doc['creative_units'], doc['priced_at_run_time'])} CU** "
        "(priced by dry run; estimated steps are priced on an existing asset)"
    )
    return "\n".join(lines) + "\n"


def tables(doc: dict[str, Any]) -> list[Any]:
    """Rich tables for a terminal."""
    from rich.table import Table

    out: list[Any] = []
    for plan in doc["manifests"]:
        c = plan["counts"]
        table = Table(
            title=f"{plan['manifest']} · {c['new']} new, {c['changed']} changed, "
            f"{c['unchanged']} unchanged, {c['rerun']} to re-run, {c['removed']} removed",
            caption=f"{_cost(plan['creative_units'], plan['priced_at_run_time'])} CU"
            + (f" (budget {plan['budget']:g} CU)" if plan.get("budget") else ""),
        )
        for col in ("item", "status", "what runs", "CU"):
            table.add_column(col, overflow="fold", justify="right" if col == "CU" else "left")
        for item in plan["items"]:
            table.add_row(
                item["id"],
                item["status"],
                _runs(item),
                _cost(item["creative_units"], item["priced_at_run_time"]),
            )
        out.append(table)
    return out


def text_total(doc: dict[str, Any]) -> str:
    return (
        f"total: {_cost(doc['creative_units'], doc['priced_at_run_time'])} CU for "
        f"{len(doc['manifests'])} manifest(s)"
    )


def over_budget(plan: dict[str, Any], cap: float) -> bool:
    """Whether a plan's priced cost exceeds a budget."""
    return float(plan["creative_units"]) > cap + budget.EPSILON
