"""The study as a task graph: data folders (made here), models to train, feature stores, cells.

Every store and cell is named by a hash of its spec, so settings shared between research questions map to the
same store or cell and are computed once (the seed-0 main cell is RQ1's seed 0, the n_gen ablation's n_gen=2
point, the steps ablation's 20-step point, and the reference of every RQ4/RQ5 comparison).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..attacks.inputs import ATTACKS, base_attack, uses_reference
from ..features.variation import unet_evaluations
from .cells import CellSpec
from .config import ExperimentConfig
from .models import Clip2Recipe, TargetRecipe, write_scene_aux
from .schedule import Task
from .stores import StoreSpec

# Rough CPU seconds per unit, measured on this machine with one torch thread, for scheduling order only.
SEC_PER_IMAGE_STEP = 0.0045
SEC_PER_TRAIN_ROW = 0.15


@dataclasses.dataclass
class Plan:
    tasks: list[Task]
    stores: dict[str, StoreSpec]  # label -> spec
    cells: dict[str, CellSpec]  # label -> spec
    models: dict[str, dict]  # label -> recipe dict and folder
    data: dict[str, str]  # label -> ImageFolder path
    tables: dict  # research question -> layout of labels


def _data(cfg: ExperimentConfig, work: Path) -> dict[str, str]:
    """The auxiliary folders (cheap, made in the main process). Named by their settings, reused when present."""
    from ..toy import BUNDLE
    from ..toy.data import write_aux_folder

    data = {}
    aux = work / "data" / f"aux-m{cfg.n_members}-n{cfg.n_nonmembers}-seed{cfg.data_seed}"
    if not (aux / "metadata.jsonl").is_file():
        write_aux_folder(aux, cfg.n_members, cfg.n_nonmembers, cfg.data_seed, world_dir=BUNDLE)
    data["aux"] = str(aux)
    # The same images without captions: the captioner writes each query's caption (RQ4 caption source).
    nocap = aux.with_name(aux.name + "-nocaption")
    if not (nocap / "metadata.jsonl").is_file():
        nocap.mkdir(parents=True, exist_ok=True)
        lines = []
        for line in (aux / "metadata.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            (nocap / row["file_name"]).write_bytes((aux / row["file_name"]).read_bytes())
            lines.append(json.dumps({"file_name": row["file_name"], "member": row["member"]}))
        (nocap / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    data["aux_nocaption"] = str(nocap)
    rq3 = work / "data" / f"rq3-world{cfg.rq3_world_seed}-m{cfg.rq3_members}-n{cfg.rq3_nonmembers}-seed{cfg.data_seed}"
    if not (rq3 / "metadata.jsonl").is_file():
        write_scene_aux(rq3, cfg.rq3_world_seed, cfg.rq3_members, cfg.rq3_nonmembers, cfg.data_seed)
    data["rq3"] = str(rq3)
    return data


def make_plan(cfg: ExperimentConfig, workdir: str | Path) -> Plan:
    cfg.validate()
    work = Path(workdir)
    data = _data(cfg, work)
    tasks: dict[str, Task] = {}
    stores: dict[str, StoreSpec] = {}
    cells: dict[str, CellSpec] = {}
    producer: dict[str, str] = {}  # store/model path -> task name

    # ---------------------------------------------------------------- models trained here
    clip2 = Clip2Recipe(cfg.clip2_seed, cfg.clip2_public, cfg.clip2_steps, cfg.clip2_batch, cfg.clip2_lr,
                        cfg.clip2_layers, cfg.clip2_hidden)
    models = {"clip2": {"recipe": clip2.to_dict(), "path": str(clip2.folder(work))}}
    tasks["model clip2"] = Task("model clip2", "audit.experiments.models:train_clip2", (clip2.to_dict(), str(work)),
                                cost=clip2.steps * clip2.batch * 0.01, stage="models")
    rq3_targets = {"untuned": ""}
    for label, steps in zip(("weak", "strong"), cfg.rq3_finetune_steps):
        r = TargetRecipe(cfg.rq3_world_seed, cfg.rq3_members, steps, cfg.rq3_batch, cfg.rq3_lr, 0)
        name = f"model rq3-{label}"
        models[f"rq3-{label}"] = {"recipe": r.to_dict(), "path": str(r.folder(work) / "target")}
        tasks[name] = Task(name, "audit.experiments.models:train_target", (r.to_dict(), str(work)),
                           cost=steps * min(r.batch, r.n_members) * 0.02, stage="models")
        rq3_targets[label] = name

    # ---------------------------------------------------------------- stores
    by_key: dict[str, StoreSpec] = {}

    def store(label: str, deps: tuple = (), **kw) -> StoreSpec:
        spec = StoreSpec(name=label.replace(" ", "_"), batch_size=cfg.batch_size, **kw)
        # The same settings under another label are the same store (its first label names the file).
        spec = by_key.setdefault(spec.key(), spec)
        stores[label] = spec
        path = str(spec.path(work))
        if path not in producer:
            name = f"store {label}"
            rows = _rows(spec.data)
            gen_cost = 0 if spec.replay else rows * spec.n_gen * spec.steps * SEC_PER_IMAGE_STEP
            if spec.tier == "gray-box":
                gen_cost = rows * 4 * len(spec.graybox_timesteps) * SEC_PER_IMAGE_STEP
            elif spec.tier == "variation":
                # n_var img2img calls per strength, each running int(strength x steps) UNet steps, plus a VAE
                # encode and decode and an embedding per variation (counted as two steps).
                evals = unet_evaluations(spec.var_strengths, spec.n_var, spec.steps)
                gen_cost = rows * (evals + 2 * spec.n_var * len(spec.var_strengths)) * SEC_PER_IMAGE_STEP
            if spec.reference:
                gen_cost *= 2  # the same features again on the reference model
            tasks[name] = Task(name, "audit.experiments.stores:build_store", (spec.to_dict(), str(work)),
                               deps=tuple(deps), cost=gen_cost + rows * 0.02, stage="features")
            producer[path] = name
        return spec

    base = store("base", data=data["aux"], n_gen=cfg.base_n_gen, steps=cfg.steps, seed=0)
    base_task = producer[str(base.path(work))]
    seeded = {0: base}
    for s in cfg.seeds:
        if s != 0:
            seeded[s] = store(f"main seed{s}", data=data["aux"], n_gen=cfg.n_gen, steps=cfg.steps, seed=s)
    by_steps = {cfg.steps: base}
    for st in cfg.steps_grid:
        if st != cfg.steps:
            by_steps[st] = store(f"steps{st}", data=data["aux"], n_gen=cfg.n_gen, steps=st, seed=0)
    captioned = store("blip-caption", data=data["aux_nocaption"], n_gen=cfg.n_gen, steps=cfg.steps, seed=0,
                      missing_caption="captioner")
    embed2 = store("clip2", deps=(base_task, "model clip2"), data=data["aux"], n_gen=cfg.n_gen, steps=cfg.steps,
                   seed=0, embedder=models["clip2"]["path"], replay=str(base.path(work)),
                   provenance={"clip2": clip2.to_dict()})
    defended = {d: store(f"defence {d.replace(':', '')}", deps=(base_task,), data=data["aux"], n_gen=cfg.n_gen,
                         steps=cfg.steps, seed=0, defence=d, replay=str(base.path(work)))
                for d in cfg.defences}
    rq3_stores: dict[str, dict[int, StoreSpec]] = {}
    rq3_gray: dict[str, dict[int, StoreSpec]] = {}
    # Gray-box stores hold only the query side and the gray-box errors; seed s draws the loss attack's noise.
    gray = {"tier": "gray-box", "graybox_timesteps": tuple(cfg.graybox_timesteps), "n_gen": cfg.n_gen,
            "steps": cfg.steps}
    gray_seeded = ({s: store(f"gray seed{s}", data=data["aux"], seed=s, **gray) for s in cfg.seeds}
                   if cfg.graybox_attacks else {})
    for label, model_task in rq3_targets.items():
        target = models[f"rq3-{label}"]["path"] if model_task else "toy"
        prov = {"target": models[f"rq3-{label}"]["recipe"]} if model_task else {}
        deps = (model_task,) if model_task else ()
        rq3_stores[label] = {s: store(f"rq3-{label} seed{s}", deps=deps,
                                      data=data["rq3"], target=target, n_gen=cfg.n_gen, steps=cfg.steps, seed=s,
                                      provenance=prov)
                             for s in cfg.seeds}
        if cfg.graybox_attacks:
            rq3_gray[label] = {s: store(f"rq3-{label} gray seed{s}", deps=deps, data=data["rq3"], target=target,
                                        seed=s, provenance=prov, **gray) for s in cfg.seeds}

    # ---------------------------------------------------------------- cells
    train = {"epochs": cfg.epochs, "patience": cfg.patience}

    cell_by_key: dict[str, CellSpec] = {}

    def cell(label: str, st: StoreSpec, seed: int, n_gen: int | None = None, deps: tuple = (),
             only: tuple = (), **kw) -> str:
        attacks = tuple(cfg.graybox_attacks if st.tier == "gray-box" else
                        cfg.variation_attacks if st.tier == "variation" else cfg.attacks)
        if only:  # a subset by base name (X keeps X and X-score)
            attacks = tuple(a for a in attacks if base_attack(a) in only) or attacks
        if st.reference:
            attacks += reference_attacks(attacks)
        spec = CellSpec(name=label.replace(" ", "_"), store=str(st.path(work)), n_gen=n_gen or 0, seed=seed,
                        attacks=attacks, train=train, n_boot=cfg.n_boot, **kw)
        # n_gen equal to the store's is the whole store: one spec, so one cell, whichever way it was asked for.
        if spec.n_gen == st.n_gen or st.tier == "gray-box":
            spec = dataclasses.replace(spec, n_gen=0)
        spec = cell_by_key.setdefault(spec.key(), spec)
        cells[label] = spec
        name = f"cell {spec.folder(work).name}"
        if name not in tasks:
            rows = _rows(st.data)
            frac = spec.fraction if spec.mode == "fraction" else 1.0
            cost = 2.0 if spec.mode == "transfer" else rows * frac * (n_gen or st.n_gen or 1) * SEC_PER_TRAIN_ROW
            # K cross-fitted members each fit on (K-1)/K of three quarters of the rows, against half for a split.
            cost *= max(1.0, spec.folds * 1.2)
            cost *= 2 if st.reference else 1  # the reference forms beside every attack, on wider inputs
            tasks[name] = Task(name, "audit.experiments.cells:run_cell", (spec.to_dict(), str(work)),
                               deps=(producer[str(st.path(work))], *deps), cost=cost, stage="heads")
        return label

    tables: dict = {"rq1": {s: cell(f"main seed{s}", seeded[s], s, cfg.n_gen) for s in cfg.seeds}}
    # The ablation references: the seed-0 images with head seed s.
    ref = {s: cell(f"ref seed{s}", base, s, cfg.n_gen) for s in cfg.ablation_seeds}
    tables["n_gen"] = {g: {s: cell(f"ngen{g} seed{s}", base, s, g) for s in cfg.ablation_seeds}
                       for g in cfg.n_gen_grid}
    tables["steps"] = {st: {s: cell(f"steps{st} seed{s}", by_steps[st], s, cfg.n_gen) for s in cfg.ablation_seeds}
                       for st in cfg.steps_grid}
    tables["aux"] = {f: {s: cell(f"aux{f:g} seed{s}", base, s, cfg.n_gen, mode="fraction", fraction=f)
                         for s in cfg.ablation_seeds} for f in cfg.aux_fractions}
    tables["caption"] = {"given": dict(ref),
                         "blip": {s: cell(f"blip-caption seed{s}", captioned, s) for s in cfg.ablation_seeds}}
    tables["embedder"] = {"toy-clip": dict(ref),
                          "clip2": {s: cell(f"clip2 seed{s}", embed2, s) for s in cfg.ablation_seeds}}
    tables["defence"] = {"none": dict(ref)}
    tables["defence_transfer"] = {}
    for d, st in defended.items():
        tables["defence"][d] = {s: cell(f"defence {d} seed{s}", st, s) for s in cfg.ablation_seeds}
        tables["defence_transfer"][d] = {
            s: cell(f"transfer {d} seed{s}", st, s, mode="transfer", heads_from=str(cells[ref[s]].folder(work)),
                    deps=(f"cell {cells[ref[s]].folder(work).name}",)) for s in cfg.ablation_seeds}
    tables["rq3"] = {label: {s: cell(f"rq3-{label} seed{s}", st[s], s) for s in cfg.seeds}
                     for label, st in rq3_stores.items()}
    # The gray-box rows of RQ1 and RQ3: the same seeds, so the same split of the same ids as the black-box cells.
    tables["rq1_gray"] = {s: cell(f"gray seed{s}", st, s) for s, st in gray_seeded.items()}
    tables["rq3_gray"] = {label: {s: cell(f"rq3-{label} gray seed{s}", st[s], s) for s in cfg.seeds}
                          for label, st in rq3_gray.items()}
    _verdict_rows(cfg, work, data, models, rq3_targets, seeded, gray_seeded, rq3_stores, rq3_gray, store, cell,
                  tables)
    _variation_rows(cfg, data, store, cell, tables)
    tables["stores"] = {"seeded": {s: _label(stores, sp) for s, sp in seeded.items()},
                        "defended": {d: _label(stores, sp) for d, sp in defended.items()},
                        "rq3": {lab: {s: _label(stores, sp) for s, sp in d.items()} for lab, d in rq3_stores.items()},
                        "gray": {s: _label(stores, sp) for s, sp in gray_seeded.items()},
                        "steps": {st: _label(stores, sp) for st, sp in by_steps.items()},
                        "caption": "blip-caption", "embedder": "clip2", "base": "base"}
    return Plan(list(tasks.values()), stores, cells, models, data, tables)


def reference_attacks(attacks) -> tuple:
    """The reference forms (``X-ref`` heads, ``X-ref-score`` untrained scores) of these attacks, registry order."""
    bases = {base_attack(a) for a in attacks}
    return tuple(a for a in ATTACKS if uses_reference(a) and base_attack(a) in bases)


def _verdict_rows(cfg: ExperimentConfig, work: Path, data: dict, models: dict, rq3_targets: dict, seeded: dict,
                  gray_seeded: dict, rq3_stores: dict, rq3_gray: dict, store, cell, tables: dict) -> None:
    """``tables["verdicts"][question][target][tier][variant] = {seed: cell label}``: the split cells (already in
    RQ1/RQ3), cross-fitted cells on the same stores, and split and cross-fitted cells on stores with a reference
    model. Every variant of a seed is scored on the same test rows (the seed's split)."""
    folds = {"crossfit": cfg.crossfit_folds} if cfg.crossfit_folds else {}
    gray = {"tier": "gray-box", "graybox_timesteps": tuple(cfg.graybox_timesteps), "n_gen": cfg.n_gen,
            "steps": cfg.steps}

    def variants(prefix: str, by_seed: dict, ref_stores: dict, n_gen) -> dict:
        only = tuple(cfg.verdict_attacks)
        out = {"split": {s: cell(f"{prefix} seed{s}", st, s, n_gen) for s, st in by_seed.items()}}
        for v, k in folds.items():
            out[v] = {s: cell(f"{prefix} {v}{k} seed{s}", st, s, n_gen, folds=k, only=only)
                      for s, st in by_seed.items()}
        if ref_stores:
            if not folds:  # the report compares cross-fitted forms when there are any
                out["reference split"] = {s: cell(f"{prefix} reference seed{s}", st, s, only=only)
                                          for s, st in ref_stores.items()}
            for v, k in folds.items():
                out[f"reference {v}"] = {s: cell(f"{prefix} reference {v}{k} seed{s}", st, s, folds=k, only=only)
                                         for s, st in ref_stores.items()}
        return out

    def ref_stores(prefix: str, reference: str, **kw) -> tuple[dict, dict]:
        black = {s: store(f"{prefix}reference seed{s}", reference=reference, n_gen=cfg.n_gen, steps=cfg.steps, seed=s,
                          **kw) for s in cfg.seeds}
        grey = ({s: store(f"{prefix}gray reference seed{s}", reference=reference, seed=s, **gray, **kw)
                 for s in cfg.seeds} if cfg.graybox_attacks else {})
        return black, grey

    v: dict = {"rq1": {}, "rq3": {}}
    black, grey = ref_stores("", cfg.reference_rq1, data=data["aux"]) if cfg.reference_rq1 else ({}, {})
    v["rq1"]["bundle"] = {"black-box": variants("main", seeded, black, cfg.n_gen)}
    if cfg.graybox_attacks:
        v["rq1"]["bundle"]["gray-box"] = variants("gray", gray_seeded, grey, None)
    for label, model_task in rq3_targets.items():
        if label not in cfg.verdict_rq3:
            continue
        target = models[f"rq3-{label}"]["path"] if model_task else "toy"
        # The fine-tunes start from the bundled target (models.train_target); the control is the bundled target.
        reference = "toy" if model_task else cfg.reference_rq1
        black, grey = {}, {}
        if reference:
            prov = {"target": models[f"rq3-{label}"]["recipe"]} if model_task else {}
            black, grey = ref_stores(f"rq3-{label} ", reference, deps=(model_task,) if model_task else (),
                                     data=data["rq3"], target=target, provenance=prov)
        v["rq3"][label] = {"black-box": variants(f"rq3-{label}", rq3_stores[label], black, None)}
        if cfg.graybox_attacks:
            v["rq3"][label]["gray-box"] = variants(f"rq3-{label} gray", rq3_gray[label], grey, None)
    tables["verdicts"] = v


def _variation_rows(cfg: ExperimentConfig, data: dict, store, cell, tables: dict) -> None:
    """RQ1's variation-tier rows (each seed, the default sweep) and RQ4's strength ablation (one store per
    strength on the seed-0 queries, head seeds ``ablation_seeds``)."""
    if not cfg.variation_attacks:
        tables["rq1_variation"], tables["var_strength"] = {}, {}
        return
    var = {"tier": "variation", "n_gen": cfg.n_gen, "steps": cfg.steps, "n_var": cfg.n_var, "data": data["aux"]}
    tables["rq1_variation"] = {
        s: cell(f"var seed{s}", store(f"var seed{s}", seed=s, var_strengths=tuple(cfg.var_strengths), **var), s)
        for s in cfg.seeds}
    tables["var_strength"] = {}
    for strength in cfg.var_strength_grid:
        st = store(f"var strength{strength:g}", seed=0, var_strengths=(float(strength),), **var)
        tables["var_strength"][strength] = {s: cell(f"var strength{strength:g} seed{s}", st, s)
                                            for s in cfg.ablation_seeds}


def _label(stores: dict[str, StoreSpec], spec: StoreSpec) -> str:
    return next(lab for lab, sp in stores.items() if sp is spec)


def _rows(folder: str) -> int:
    meta = Path(folder) / "metadata.jsonl"
    return sum(1 for line in meta.read_text(encoding="utf-8").splitlines() if line.strip())
