"""Read-only reports built from the lineage database: a run's document and a file's lineage.

    run_report(repo, run_id)    the run document of the README (`--json`, status, gallery)
    lineage(repo, ref)          every stored file matching a key, URI, sha256, asset or job
                                id, each traced through its recipe chain to the first
                                generation, the item, the manifest and the run

Every stored file has a chain: the node that made it, that node's input (its parent's
output), and so on up to the generation. A reused node (its key succeeded in an earlier run,
so nothing was paid) shows the job of the node it reused.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from pipeline.models import (
    AssetRow,
    ItemInputRow,
    ItemRow,
    ItemStatus,
    JobRow,
    ManifestRow,
    NodeRow,
    ObjectRow,
    RunRow,
)
from pipeline.repository import Repository
from pipeline.scenario import JobStatus

_BUCKETS = {
    ItemStatus.SUCCEEDED: "succeeded",
    ItemStatus.FAILED: "failed",
    ItemStatus.SKIPPED: "skipped",
    ItemStatus.CANCELED: "canceled",
}


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


class _Chains:
    """Nodes and their jobs, loaded once, to describe chains without a query per step."""

    def __init__(self, s: Session, item_ids: Iterable[int]) -> None:
        self.s = s
        self.nodes: dict[int, NodeRow] = {}
        self.jobs: dict[int, list[JobRow]] = {}
        self._load(NodeRow.item_id.in_(list(set(item_ids))))

    def _load(self, condition: Any) -> None:
        found = list(self.s.execute(select(NodeRow).where(condition)).scalars())
        for node in found:
            self.nodes[node.id] = node
        missing = {n.reused_from_id for n in found if n.reused_from_id} - set(self.nodes)
        missing |= {n.parent_id for n in found if n.parent_id} - set(self.nodes)
        ids = [n.id for n in found]
        for job in self.s.execute(select(JobRow).where(JobRow.node_id.in_(ids))).scalars():
            self.jobs.setdefault(job.node_id, []).append(job)
        if missing:
            self._load(NodeRow.id.in_(list(missing)))

    def job_of(self, node: NodeRow) -> JobRow | None:
        """The job whose outputs the node holds (its own, or the reused node's)."""
        source = node
        while source.reused_from_id and source.reused_from_id in self.nodes:
            source = self.nodes[source.reused_from_id]
        jobs = self.jobs.get(source.id, [])
        done = [j for j in jobs if j.status == JobStatus.SUCCESS] or jobs
        return done[-1] if done else None

    def chain(self, node_id: int, output_asset: str | None) -> list[dict[str, Any]]:
        """The steps from the first generation to `node_id`, each with what it passed on."""
        steps: list[dict[str, Any]] = []
        node: NodeRow | None = self.nodes.get(node_id)
        passed_on = output_asset
        while node is not None:
            job = self.job_of(node)
            params = {k: v for k, v in (node.body or {}).items() if k not in ("image",)}
            steps.append(
                {
                    "step": node.step,
                    "model": node.model,
                    "endpoint": node.endpoint,
                    "node_key": node.node_key,
                    "params": params,
                    "input_asset": node.input_asset,
                    "output_asset": passed_on,
                    "reused": node.reused_from_id is not None,
                    "job": _job_doc(job),
                }
            )
            passed_on = node.input_asset
            node = self.nodes.get(node.parent_id) if node.parent_id else None
        return list(reversed(steps))


def _seconds(start: Any, end: Any) -> float | None:
    return round((end - start).total_seconds(), 3) if start and end else None


def _job_doc(job: JobRow | None) -> dict[str, Any] | None:
    if job is None:
        return None
    return {
        "id": job.scenario_job_id,
        "type": job.job_type,
        "attempt": job.attempt,
        "status": str(job.status) if job.status else None,
        "creative_units": job.cost_cu,
        "submitted_at": _iso(job.accepted_at),
        "finished_at": _iso(job.finished_at),
    }


def _output_doc(obj: ObjectRow, asset_id: str | None) -> dict[str, Any]:
    return {
        "index": obj.output_index,
        "uri": obj.uri,
        "sha256": obj.sha256,
        "bytes": obj.bytes,
        "asset_id": asset_id,
        "public_url": obj.public_url,
    }


def run_report(repo: Repository, run_id: str) -> dict[str, Any] | None:
    """The run document of the README, built from SQL."""
    with repo.session() as s:
        row = s.execute(
            select(RunRow, ManifestRow)
            .join(ManifestRow, RunRow.manifest_id == ManifestRow.id)
            .where(RunRow.id == run_id)
        ).first()
        if row is None:
            return None
        run, manifest = row
        items = list(
            s.execute(
                select(ItemRow).where(ItemRow.run_id == run_id).order_by(ItemRow.id)
            ).scalars()
        )
        holders = {i.id: i.skipped_from_id or i.id for i in items}
        chains = _Chains(s, set(holders.values()) | set(holders))
        objects: dict[int, list[tuple[ObjectRow, str]]] = {}
        for obj, asset_id in s.execute(
            select(ObjectRow, AssetRow.scenario_asset_id)
            .join(AssetRow, ObjectRow.asset_id == AssetRow.id)
            .where(ObjectRow.item_id.in_(set(holders.values())), ObjectRow.final.is_(True))
            .order_by(ObjectRow.output_index, ObjectRow.id)
        ).all():
            objects.setdefault(obj.item_id, []).append((obj, asset_id))
        counts = {"total": len(items), "succeeded": 0, "failed": 0, "skipped": 0}
        counts.update({"canceled": 0, "pending": 0})
        cost = 0.0
        docs = []
        by_item: dict[int, list[NodeRow]] = {}
        for node in chains.nodes.values():
            by_item.setdefault(node.item_id, []).append(node)
        for item in items:
            counts[_BUCKETS.get(item.status, "pending")] += 1
            own = sorted(by_item.get(item.id, []), key=lambda n: n.id)
            jobs = [j for n in own for j in chains.jobs.get(n.id, [])]
            cost += sum(j.cost_cu or 0.0 for j in jobs)
            outputs = []
            for obj, asset_id in objects.get(holders[item.id], []):
                doc = _output_doc(obj, asset_id)
                doc["chain"] = [
                    {k: step[k] for k in ("step", "model", "output_asset", "reused")}
                    | {"job_id": (step["job"] or {}).get("id")}
                    for step in chains.chain(obj.node_id, asset_id)
                ]
                outputs.append(doc)
            docs.append(
                {
                    "id": item.manifest_item_id,
                    "item_key": item.item_key,
                    "status": str(item.status),
                    "attempts": sum(n.attempts for n in own),
                    "jobs": [j.scenario_job_id for j in jobs if j.scenario_job_id],
                    "nodes": len(own),
                    "reused_nodes": sum(1 for n in own if n.reused_from_id),
                    "error": item.error,
                    "hint": item.hint,
                    "seed": item.seed,
                    "prompt": item.prompt,
                    "duration_seconds": _seconds(item.created_at, item.finished_at),
                    "outputs": outputs,
                }
            )
        return {
            "run_id": run.id,
            "manifest": {"name": manifest.name, "path": manifest.path, "sha256": manifest.sha256},
            "status": str(run.status),
            "trigger": run.trigger,
            "created_at": _iso(run.created_at),
            "finished_at": _iso(run.finished_at),
            "error": run.error,
            "counts": counts,
            "creative_units": round(cost, 4),
            "items": docs,
        }


def lineage(repo: Repository, refs: Sequence[str]) -> list[dict[str, Any]]:
    """Trace storage URIs or keys, sha256s, Scenario asset ids or job ids to their origin."""
    with repo.session() as s:
        conditions = []
        for ref in refs:
            job_nodes = select(JobRow.node_id).where(JobRow.scenario_job_id == ref)
            conditions += [
                ObjectRow.uri == ref,
                ObjectRow.key == ref,
                ObjectRow.sha256 == ref.lower(),
                AssetRow.scenario_asset_id == ref,
                ObjectRow.node_id.in_(job_nodes),
            ]
        rows = s.execute(
            select(ObjectRow, AssetRow, ItemRow, RunRow, ManifestRow)
            .join(AssetRow, ObjectRow.asset_id == AssetRow.id)
            .join(ItemRow, ObjectRow.item_id == ItemRow.id)
            .join(RunRow, ItemRow.run_id == RunRow.id)
            .join(ManifestRow, RunRow.manifest_id == ManifestRow.id)
            .where(or_(*conditions))
            .order_by(ObjectRow.id)
        ).all()
        chains = _Chains(s, {item.id for _, _, item, _, _ in rows})
        docs = []
        for obj, asset, item, run, manifest in rows:
            inputs = s.execute(
                select(ItemInputRow, AssetRow)
                .outerjoin(AssetRow, ItemInputRow.asset_id == AssetRow.id)
                .where(ItemInputRow.item_id == item.id)
            ).all()
            chain = chains.chain(obj.node_id, asset.scenario_asset_id)
            versions = s.execute(
                select(ObjectRow, AssetRow.scenario_asset_id, ItemRow.run_id)
                .join(AssetRow, ObjectRow.asset_id == AssetRow.id)
                .join(ItemRow, ObjectRow.item_id == ItemRow.id)
                .where(ObjectRow.key == obj.key)
                .order_by(ObjectRow.id)
            ).all()
            docs.append(
                {
                    "object": _output_doc(obj, asset.scenario_asset_id)
                    | {
                        "key": obj.key,
                        "content_type": obj.content_type,
                        "stored_at": _iso(obj.created_at),
                        "current": versions[-1][0].id == obj.id if versions else True,
                    },
                    "run": {
                        "id": run.id,
                        "status": str(run.status),
                        "trigger": run.trigger,
                        "created_at": _iso(run.created_at),
                        "git_sha": run.git_sha,
                    },
                    "manifest": {
                        "name": manifest.name,
                        "path": manifest.path,
                        "sha256": manifest.sha256,
                    },
                    "item": {
                        "id": item.manifest_item_id,
                        "line": item.line,
                        "item_key": item.item_key,
                        "prompt": item.prompt,
                        "seed": item.seed,
                        "model": item.model,
                        "trained_model": item.trained_model,
                        "params": item.params,
                    },
                    "chain": chain,
                    "job": chain[-1]["job"] if chain else None,
                    "asset": {
                        "id": asset.scenario_asset_id,
                        "index": asset.output_index,
                        "parent": chain[-1]["input_asset"] if chain else None,
                        "mime_type": asset.mime_type,
                        "width": asset.width,
                        "height": asset.height,
                        "source_host": asset.source_host,
                    },
                    "inputs": [
                        {
                            "role": inp.role,
                            "path": inp.path,
                            "sha256": inp.sha256,
                            "asset_id": a.scenario_asset_id if a else None,
                        }
                        for inp, a in inputs
                    ],
                    "versions": [
                        {
                            "sha256": v.sha256,
                            "asset_id": v_asset,
                            "run_id": v_run,
                            "stored_at": _iso(v.created_at),
                        }
                        for v, v_asset, v_run in versions
                    ],
                }
            )
        return docs
