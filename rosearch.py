# RoSearch: Search for Robust Student Architectures When Distilling Pre-trained Language Models (preprint 2021,
# arXiv 2106.03613). Only the abstract was available: this reconstructs ../shared/specs/rosearch.md (§ numbers refer
# to it); every choice the abstract does not confirm is a flag and a deviation in docs/rosearch.md.
import argparse
import copy
import hashlib
import json
import os
import random
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from attacks import read_records
from bench import bench_rosearch
from common import (ATTACK_RECIPES, UsageError, add_common_args, append_jsonl, check_range, check_ranges,
                    count_params, parse_choices, predict_labels, save_atomic, set_seed, start_run, usage_errors,
                    validate_common_args)
from finetune import Distillation, add_distillation_args

METHOD = "rosearch"
INPUTS, NODES, EDGES_PER_NODE = 2, 3, 2  # a cell reads the previous two cells; B = 3 nodes of two edges (§2.3)
# operation name -> (kind, kernel, dilation): AdaBERT's 10-op set, plus optional self-attention (§2.3)
OPS = {"conv3": ("conv", 3, 1), "conv5": ("conv", 5, 1), "conv7": ("conv", 7, 1), "dil_conv3": ("conv", 3, 2),
       "dil_conv5": ("conv", 5, 2), "dil_conv7": ("conv", 7, 2), "max_pool3": ("max", 3, 1), "avg_pool3": ("avg", 3, 1),
       "identity": ("identity", 0, 0), "zero": ("zero", 0, 0), "attention": ("attention", 0, 0)}
MUTATIONS = {"op": 0.5, "input": 0.3, "depth": 0.1, "width": 0.1}  # §3.3
MAX_REDRAWS = 500  # proposals tried before the space is declared exhausted
# a row -> its setting; the first three are searches (the first is the method), every row is evaluated alike
ROWS = {"rosearch": "RoSearch student", "accuracy-only": "accuracy-only search", "random-search": "random search",
        "handmade": "hand-made student", "teacher": "teacher"}
RESUME_FREE = ("resume", "attack_workers", "track", "speed_examples")  # flags a resumed run may change


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="RoSearch (arXiv 2106.03613), reconstructed: docs/rosearch.md")
    add_common_args(p, METHOD, lr=2e-5, epochs=3, attacks="textfooler,pwws,bert-attack")
    add_distillation_args(p, METHOD)  # --teacher, --cache-dir, --speed-examples, --kd-*, --student-*
    on = dict(action=argparse.BooleanOptionalAction, default=True)
    s = p.add_argument_group("RoSearch: search space (§2)")
    s.add_argument("--ops", default=",".join(op for op in OPS if op != "attention"), help=f"edge ops: {', '.join(OPS)}")
    s.add_argument("--min-cells", type=int, default=1, help="smallest number of cells K")
    s.add_argument("--max-cells", type=int, default=8, help="largest number of cells K (AdaBERT K_max = 8)")
    s.add_argument("--hidden", default="128,256,512", help="student width H; a comma list makes H part of the genotype")
    s.add_argument("--heads", type=int, default=4, help="heads of the optional 'attention' op")
    s.add_argument("--cell-combine", default="weighted-sum", choices=["weighted-sum", "concat"],
                   help="cell output: softmax-weighted sum of its nodes (AdaBERT) or concat + linear")
    s.add_argument("--cell-residual", **on, help="add the previous cell's output before a cell's LayerNorm")
    s.add_argument("--freeze-embeddings", **on, help="keep the teacher's embedding tables frozen in the student")
    s.add_argument("--student-embeddings", default="folded", choices=["folded", "teacher"], help="folded: P folded "
                   "into H-wide tables after training (AdaBERT); teacher: the teacher's embedding block, d-wide")
    s.add_argument("--dropout", type=float, default=0.1, help="dropout of the student's classifier")
    s.add_argument("--handmade-cells", type=int, default=4, help="cells of the hand-made baseline (a conv3 stack)")
    e = p.add_argument_group("RoSearch: fitness, evolution and KD budget (§3, §4.3, §5)")
    e.add_argument("--fitness-weights", default="0.5,0.5,0.05", help="w_r,w_a,w_e: weights of R, A, E in F (§5.4)")
    e.add_argument("--fitness-attack", choices=["pgd", *ATTACK_RECIPES], help="R's attack: a TextAttack recipe or pgd "
                   "(embedding PGD); default textfooler (deepwordbug under --bench)")
    e.add_argument("--probe-examples", type=int, help="N_r: stratified dev probe size; default 200 (--bench: 100)")
    e.add_argument("--accuracy-floor", type=float, default=0.9, help="no R credit below this x teacher dev accuracy")
    e.add_argument("--probe-seed", type=int, default=0, help="seed of the probe set (same for every candidate)")
    e.add_argument("--probe-pgd-radius", type=float, default=0.5, help="l2 radius when --fitness-attack pgd")
    e.add_argument("--min-compression", type=float, default=4.6, help="hard budget: teacher/student params >= this")
    e.add_argument("--compression-basis", default="total", choices=["non_embedding", "total"],
                   help="parameters the budget and E count: all, or without the embedding tables")
    e.add_argument("--population", type=int, default=20, help="P: population of regularized evolution (§3.3)")
    e.add_argument("--tournament", type=int, default=5, help="S: tournament size (§3.3)")
    e.add_argument("--cycles", type=int, default=80, help="C: evolution cycles; P + C candidates in all (§3.3)")
    e.add_argument("--crossover-prob", type=float, default=0.0, help="chance of a node-wise crossover before mutation")
    e.add_argument("--top-k", type=int, default=3, help="finalists re-trained with --final-epochs (§3.3)")
    e.add_argument("--proxy-epochs", type=float, default=1.0, help="KD epochs of a candidate during search (§4.3)")
    e.add_argument("--final-epochs", type=float, default=10.0, help="KD epochs of each finalist (§3.3, §4.3)")
    r = p.add_argument_group("RoSearch: rows, resume, benchmark")
    r.add_argument("--extra-rows", default="teacher,handmade", help=f"more rows, of {', '.join(list(ROWS)[1:])}; none")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue this run folder in place (same flags)")
    r.add_argument("--bench", action="store_true", help="time candidates and inference, exit (bench.bench_rosearch)")
    r.add_argument("--bench-candidates", type=int, default=2, help="candidates timed by --bench")
    return p.parse_args(argv)


def validate(args):
    args.fitness_attack = args.fitness_attack or "textfooler"  # (bench.bench_rosearch sets its own defaults first)
    args.probe_examples = args.probe_examples or 200
    validate_common_args(args)
    args.ops_list = parse_choices(args.ops, OPS, "--ops", "op")
    if not args.ops_list:
        raise UsageError("--ops is empty: the search space has no operation; give e.g. --ops conv3,identity")
    try:
        args.hidden_list = sorted({int(h) for h in args.hidden.split(",")})
        args.weights = [float(w) for w in args.fitness_weights.split(",")]
    except ValueError:
        raise UsageError("--hidden is a comma list of integers and --fitness-weights three numbers w_r,w_a,w_e")
    if len(args.weights) != 3 or min(args.weights) < 0 or sum(args.weights[:2]) == 0:
        raise UsageError(f"--fitness-weights needs three non-negative numbers, w_r + w_a > 0: {args.fitness_weights}")
    check_range("hidden", args.hidden_list[0], 1)  # the smallest
    if "attention" in args.ops_list and any(h % args.heads for h in args.hidden_list):
        raise UsageError(f"--hidden {args.hidden}: each width must be a multiple of --heads {args.heads} (attention)")
    check_ranges(args, ("min_cells", "population", "tournament", "probe_examples", "top_k", "bench_candidates",
                        "speed_examples", "student_batch_size", "handmade_cells"), 1)
    check_ranges(args, ("kd_temperature", "min_compression", "proxy_epochs", "final_epochs", "student_lr",
                        "probe_pgd_radius"), 0, low_open=True)
    check_ranges(args, ("kd_alpha", "crossover_prob", "accuracy_floor"), 0, 1)
    check_range("max-cells", args.max_cells, args.min_cells)
    check_range("cycles", args.cycles, 0)
    check_range("tournament", args.tournament, 1, args.population)
    args.rows = parse_choices(args.extra_rows, list(ROWS)[1:], "--extra-rows", "row")
    return args


# ---- Search space (§2.3): {"hidden": H, "cells": [K x [B nodes x [two [input, op] edges]]]}; input 0, 1: the
# previous two cells, 2..: earlier nodes -------------------------------------------------------------------------
def genotype_hash(genotype) -> str:
    return hashlib.sha1(json.dumps(genotype, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]


class Op(nn.Module):
    """One edge on (batch, length, H) states; padded positions are zeroed before and after, so they never leak."""

    def __init__(self, name: str, hidden: int, heads: int):
        super().__init__()
        self.kind, kernel, dilation = OPS[name]
        if self.kind == "conv":  # ReLU-Conv as AdaBERT, 'same' padding
            self.conv = nn.Conv1d(hidden, hidden, kernel, dilation=dilation, padding=dilation * (kernel - 1) // 2)
        elif self.kind == "attention":
            self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)

    def forward(self, x, mask):
        pad = mask == 0
        x = x.masked_fill(pad, 0.0)
        if self.kind in ("zero", "identity"):
            return x if self.kind == "identity" else torch.zeros_like(x)
        if self.kind == "conv":
            y = self.conv(F.relu(x).transpose(1, 2)).transpose(1, 2)
        elif self.kind == "max":
            y = F.max_pool1d(x.masked_fill(pad, float("-inf")).transpose(1, 2), 3, 1, 1).transpose(1, 2)
        elif self.kind == "avg":  # mean over the real tokens of the window
            total = F.avg_pool1d(x.transpose(1, 2), 3, 1, 1, count_include_pad=True)
            real = F.avg_pool1d(mask.transpose(1, 2), 3, 1, 1, count_include_pad=True)
            y = (total / real.clamp_min(1e-6)).transpose(1, 2)
        else:
            y = self.attn(x, x, x, key_padding_mask=pad.squeeze(-1), need_weights=False)[0]
        return y.masked_fill(pad, 0.0)


class Cell(nn.Module):
    """A DAG of B nodes; node j = sum of its two edges' ops on earlier states (§2.3)."""

    def __init__(self, cell, hidden, heads, combine, residual):
        super().__init__()
        self.inputs = [inp for node in cell for inp, _ in node]
        self.edges = nn.ModuleList(Op(op, hidden, heads) for node in cell for _, op in node)
        self.combine, self.residual = combine, residual
        if combine == "weighted-sum":
            self.node_logits = nn.Parameter(torch.zeros(NODES))
        else:
            self.merge = nn.Linear(NODES * hidden, hidden)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, s0, s1, mask):
        states = [s0, s1]
        for j in range(NODES):
            edges = range(EDGES_PER_NODE * j, EDGES_PER_NODE * (j + 1))
            states.append(sum(self.edges[e](states[self.inputs[e]], mask) for e in edges))
        nodes = states[INPUTS:]
        if self.combine == "weighted-sum":
            out = torch.einsum("n,nbld->bld", self.node_logits.softmax(0).to(s1.dtype), torch.stack(nodes))
        else:
            out = self.merge(torch.cat(nodes, -1))
        return self.norm(out + s1 if self.residual else out) * mask


class Student(nn.Module):
    """Teacher embeddings -> projection P to H -> K cells -> masked mean pool -> tanh -> classifier (§2.3-2.4)."""

    def __init__(self, genotype, embeddings, embed_dim, num_labels, heads=4, combine="weighted-sum", residual=True,
                 dropout=0.1, folded=False):
        super().__init__()
        self.genotype, hidden, self.folded = genotype, genotype["hidden"], folded
        self.project = nn.Linear(embed_dim, hidden)
        self.embed_norm = nn.LayerNorm(hidden) if folded else None
        self.cells = nn.ModuleList(Cell(c, hidden, heads, combine, residual) for c in genotype["cells"])
        self.dropout = nn.Dropout(dropout)
        self.pooler = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, num_labels)
        self.embeddings = copy.deepcopy(embeddings).cpu() if embeddings is not None else None  # the teacher's block

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, token_type_ids=None, **unused):
        shape = (input_ids if input_ids is not None else inputs_embeds[..., 0]).shape
        device = self.classifier.weight.device
        if self.folded:  # LayerNorm_H(P (w + p + t)): P folds exactly into the tables (fold)
            e = self.embeddings
            words = inputs_embeds if inputs_embeds is not None else e.word_embeddings(input_ids)
            types = torch.zeros(shape, dtype=torch.long, device=device) if token_type_ids is None else token_type_ids
            offset = getattr(e, "padding_idx", -1) + 1  # RoBERTa's positions start after its padding index
            positions = e.position_embeddings(torch.arange(shape[1], device=device)[None] + offset)
            x = e.dropout(self.embed_norm(self.project(words + positions + e.token_type_embeddings(types))))
        else:
            x = self.project(self.embeddings(input_ids=None if inputs_embeds is not None else input_ids,
                                             token_type_ids=token_type_ids, inputs_embeds=inputs_embeds))
        attention_mask = torch.ones(shape, device=device) if attention_mask is None else attention_mask
        mask = attention_mask.unsqueeze(-1).to(x.dtype)
        s0 = s1 = x * mask
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, mask)
        pooled = (s1 * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.classifier(self.dropout(torch.tanh(self.pooler(self.dropout(pooled)))))

    @torch.no_grad()
    def fold(self):
        """AdaBERT's export: table x P^T, H wide (P's bias into the type table); same logits (docs/rosearch.md)."""
        if not self.folded or isinstance(self.project, nn.Identity):
            return self
        e, p = self.embeddings, self.project
        for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
            table = getattr(e, name)
            new = nn.Embedding(table.num_embeddings, p.out_features, padding_idx=table.padding_idx)
            new.weight.copy_(table.weight @ p.weight.T + (p.bias if name == "token_type_embeddings" else 0))
            setattr(e, name, new.requires_grad_(False).to(table.weight.device))
        e.LayerNorm, self.project = nn.Identity(), nn.Identity()
        return self

    def save(self, path: str, config: dict, record=None):
        """student.pt: genotype, weights, the constructor's other arguments (Space.student) and the record."""
        save_atomic(dict(genotype=self.genotype, state_dict=self.state_dict(), record=record, config=config), path)

    @classmethod
    def load(cls, path: str, teacher):
        """A saved student.pt back as (model, record); the teacher provides the embedding module's shape."""
        saved = torch.load(path, map_location="cpu")
        student = cls(saved["genotype"], teacher.base_model.embeddings, **saved["config"])
        student.load_state_dict(saved["state_dict"])
        return student, saved["record"]


@dataclass
class Space:
    """The search space (§2.3) and the hard budget (§5.4); student: the Student's other arguments (saved config)."""
    ops: list
    min_cells: int
    max_cells: int
    hidden_choices: list
    student: dict
    teacher_params: dict
    embedding_params: int = 0  # the whole teacher embedding block a "teacher"-embeddings student reuses
    embedding_tables: int = 0  # of which the word, position and type tables (rows x embed_dim; folded: rows x H)
    basis: str = "non_embedding"
    min_compression: float = 4.6
    _params: dict = field(default_factory=dict, repr=False)

    def params(self, genotype) -> dict:
        """count_params of the student, from a meta-device build (no memory, no init)."""
        key = genotype_hash(genotype)
        if key not in self._params:
            with torch.device("meta"):
                n = sum(p.numel() for p in Student(genotype, None, **self.student).parameters())
            h = genotype["hidden"]
            if self.student.get("folded"):  # P (d x H + H) folded into the tables: rows x H
                tables = self.embedding_tables // self.student["embed_dim"] * h  # the teacher's rows, H wide
                n += tables - (self.student["embed_dim"] * h + h)
            else:
                n, tables = n + self.embedding_params, self.embedding_tables
            self._params[key] = {"total": n, "non_embedding": n - tables}
        return self._params[key]

    def compression(self, params: dict) -> dict:
        return {k: self.teacher_params[k] / max(params[k], 1) for k in ("total", "non_embedding")}

    def within_budget(self, genotype) -> bool:
        return self.compression(self.params(genotype))[self.basis] >= self.min_compression

    def is_valid(self, genotype) -> bool:
        cells = genotype.get("cells", [])
        if genotype.get("hidden") not in self.hidden_choices or not self.min_cells <= len(cells) <= self.max_cells:
            return False
        edges_ok = (len(node) == EDGES_PER_NODE and all(0 <= inp < INPUTS + j and op in self.ops for inp, op in node)
                    for cell in cells for j, node in enumerate(cell))
        return all(len(cell) == NODES for cell in cells) and all(edges_ok)

    def random_cell(self, rng: random.Random) -> list:
        return [[[rng.randrange(INPUTS + j), rng.choice(self.ops)] for _ in range(EDGES_PER_NODE)]
                for j in range(NODES)]

    def random_genotype(self, rng: random.Random) -> dict:
        return {"hidden": rng.choice(self.hidden_choices),
                "cells": [self.random_cell(rng) for _ in range(rng.randint(self.min_cells, self.max_cells))]}

    def flops(self, genotype, seq_len: int) -> int:
        """Analytic forward FLOPs per token past the embeddings (2 x multiply-adds; what counts: docs/rosearch.md)."""
        h = genotype["hidden"]
        total = 0 if self.student.get("folded") else 2 * self.student["embed_dim"] * h
        for cell in genotype["cells"]:
            for _, op in (edge for node in cell for edge in node):
                kind, kernel, _ = OPS[op]
                total += {"conv": 2 * h * h * kernel, "attention": 2 * (4 * h * h + 2 * seq_len * h),
                          "max": 3 * h, "avg": 3 * h}.get(kind, 0)
            total += 2 * NODES * h * h if self.student.get("combine") == "concat" else 2 * NODES * h
        return total

    def check(self):
        """The cheapest genotype (fewest cells, smallest width, cheapest op) must meet the budget."""
        h, k = self.hidden_choices[0], self.min_cells
        candidates = ({"hidden": h, "cells": [[[[0, op]] * EDGES_PER_NODE] * NODES] * k} for op in self.ops)
        smallest = min(candidates, key=lambda g: self.params(g)[self.basis])
        if not self.within_budget(smallest):
            raise UsageError(f"no genotype meets --min-compression {self.min_compression}: the smallest student has "
                             f"{self.params(smallest)[self.basis]:,} {self.basis} params vs "
                             f"{self.teacher_params[self.basis]:,} in the teacher; lower --min-compression/--hidden/"
                             f"--min-cells or use --compression-basis non_embedding")


def mutate(genotype, space: Space, rng: random.Random):
    """One of: resample an op, re-wire an input, depth K +- 1, width one step (§3.3)."""
    child = copy.deepcopy(genotype)
    kinds = {"op": len(space.ops) > 1, "input": True, "depth": space.max_cells > space.min_cells,
             "width": len(space.hidden_choices) > 1}
    kinds = [k for k, ok in kinds.items() if ok]
    kind = rng.choices(kinds, weights=[MUTATIONS[k] for k in kinds])[0]
    c, j, e = rng.randrange(len(child["cells"])), rng.randrange(NODES), rng.randrange(EDGES_PER_NODE)
    edge = child["cells"][c][j][e]
    if kind == "op":
        edge[1] = rng.choice([op for op in space.ops if op != edge[1]])
    elif kind == "input":
        edge[0] = rng.choice([i for i in range(INPUTS + j) if i != edge[0]])
    elif kind == "depth":
        grow = len(child["cells"]) == space.min_cells or (len(child["cells"]) < space.max_cells and rng.random() < 0.5)
        child["cells"] = child["cells"] + [space.random_cell(rng)] if grow else child["cells"][:-1]
    else:
        i = space.hidden_choices.index(child["hidden"])
        i = rng.choice([k for k in (i - 1, i + 1) if 0 <= k < len(space.hidden_choices)])
        child["hidden"] = space.hidden_choices[i]
    return child


def crossover(a, b, rng: random.Random):
    """Uniform node-wise crossover; depth from the first parent, width from either (§3.3, optional)."""
    cells = [[copy.deepcopy(rng.choice([na, nb])) for na, nb in zip(ca, cb)] for ca, cb in zip(a["cells"], b["cells"])]
    return {"hidden": rng.choice([a["hidden"], b["hidden"]]), "cells": cells + copy.deepcopy(a["cells"][len(cells):])}


# ---- Fitness (§5.4, reconstructed): F = w_r R + w_a A + w_e 100 (1 - E / E_max); R, A in %, E = student/teacher
def fitness(record, weights) -> float:
    """R_credit is R, or 0 below the accuracy floor (records without it: R)."""
    w_r, w_a, w_e = weights
    r = record.get("R_credit", record["R"])
    return w_r * r + w_a * record["A"] + w_e * 100.0 * (1.0 - record["E"] / record["E_max"])


def credit(record: dict, floor_accuracy: float) -> dict:
    """The collapse guard: no robustness credit below the floor (a one-class student scores R = its class share)."""
    return {**record, "A_floor": floor_accuracy, "R_credit": record["R"] if record["A"] >= floor_accuracy else 0.0}


# ---- Regularized (aging) evolution (Real et al. 2019; §3.2-3.3), seeded per candidate: a resume replays exactly ----
def evolve(space: Space, args, weights, evaluate, stored=None, on_record=lambda r: None, random_search=False) -> list:
    """P random genotypes, then C tournament children; random_search: all P + C random (the equal-budget control)."""
    stored, population, history, seen = stored or {}, deque(maxlen=args.population), [], set()
    for index in range(args.population + args.cycles):
        rng = random.Random(args.seed * 1_000_003 + index)
        proposers = [("random", lambda: space.random_genotype(rng))]
        if index >= args.population and not random_search:
            contenders = sorted(rng.sample(list(population), args.tournament), key=lambda r: -fitness(r, weights))
            parents = [c["genotype"] for c in contenders]
            crossed = len(parents) >= 2 and rng.random() < args.crossover_prob

            def child():
                return mutate(crossover(parents[0], parents[1], rng) if crossed else parents[0], space, rng)
            # a parent whose neighbours are all seen falls back to the next contenders, then to a random genotype
            proposers = [("mutation", child)] + [(f"mutation of contender {i}", lambda g=g: mutate(g, space, rng))
                                                 for i, g in enumerate(parents[1:], 1)] + proposers
        # the first proposal that is new (by hash), valid and within budget; up to MAX_REDRAWS per proposer, in order
        draws = ((how, propose()) for how, propose in proposers for _ in range(MAX_REDRAWS))
        how, genotype = next(((how, g) for how, g in draws if genotype_hash(g) not in seen and space.is_valid(g)
                              and space.within_budget(g)), (None, None))
        if genotype is None:
            raise UsageError(f"search space exhausted at candidate {index}: no new genotype within budget after "
                             f"{MAX_REDRAWS} draws of each proposal, random ones included; lower --population/--cycles "
                             f"or widen --ops/--max-cells/--hidden")
        key = genotype_hash(genotype)
        seen.add(key)
        record = stored.get(index)
        if record is not None and record["hash"] != key:
            raise UsageError(f"--resume: candidate {index} of the history differs from this run's ({record['hash']} vs "
                             f"{key}); resume with the same --seed and search flags")
        record = {**(record or evaluate(genotype, index)), "index": index, "hash": key, "genotype": genotype,
                  "proposal": how}
        record["fitness"] = fitness(record, weights)
        on_record(record)
        population.append(record)  # aging: the full deque drops its oldest member, not its worst
        history.append(record)
    return history


def check_record(record: dict):
    """A history line a killed search wrote in full (else it raises): R, A, E, E_max numbers, its genotype's hash."""
    for k in ("R", "A", "E", "E_max"):
        float(record[k])  # a number, or ValueError / TypeError / KeyError
    if genotype_hash(record["genotype"]) != record["hash"]:
        raise ValueError("hash mismatch")


# ---- Knowledge distillation from the teacher's cached logits (§4.3): finetune.Distillation.distill, kd_loss ---
def build_student(genotype, ctx):
    student = Student(genotype, ctx.teacher.base_model.embeddings, **ctx.space.student)
    student.embeddings.requires_grad_(not ctx.args.freeze_embeddings)
    return student.to(ctx.run.device)


def train_and_score(genotype, ctx, epochs, tag):
    """KD-train one candidate from the cached logits, then A (dev accuracy) and R (probe attack): §4-5."""
    args, space = ctx.args, ctx.space
    seed = int(hashlib.sha1(f"{args.seed}:{genotype_hash(genotype)}".encode()).hexdigest(), 16) % 2 ** 31
    set_seed(seed)  # a genotype's result depends only on (seed, genotype): shared by all searches and resumes
    student, start = build_student(genotype, ctx), time.time()
    # L = (1 - alpha) CE(y, z_s) + alpha T^2 KL(softmax(z_t / T) || softmax(z_s / T))   (§4.3; finetune.kd_loss)
    fit = ctx.distill(student, epochs, seed, tag)
    kd_seconds, start = time.time() - start, time.time()
    predicted, _ = predict_labels(student, ctx.dev_loader, ctx.run.device, ctx.run.autocast)
    r, not_fooled = ctx.probe_accuracy(student)  # R: accuracy under --fitness-attack on the fixed probe set (§5)
    params = space.params(genotype)  # = count_params(student) (tested)
    ratio = space.compression(params)
    record = {"A": 100.0 * fit["dev_accuracy"], "R": r, "probe_not_fooled": not_fooled, "E": 1.0 / ratio[space.basis],
              "E_max": 1.0 / space.min_compression, "params": params, "compression": ratio,
              "flops_per_token": space.flops(genotype, args.max_seq_length),
              "majority_share": float(np.bincount(predicted).max() / len(predicted)),
              "kd_seconds": kd_seconds, "probe_seconds": time.time() - start}
    return student, credit(record, ctx.floor)


# ---- Final stage (§6-7): finalists, rows -----------------------------------------------------------------------
def trained(genotype, ctx, tag):
    """A finalist trained with --final-epochs, saved to students/{hash}.pt: loaded, not retrained, when seen again."""
    path = os.path.join(ctx.run.dir, "students", f"{genotype_hash(genotype)}.pt")
    if not os.path.isfile(path):
        student, record = train_and_score(genotype, ctx, ctx.args.final_epochs, tag)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        student.save(path, ctx.space.student, record)
    student, record = Student.load(path, ctx.teacher)
    return student.to(ctx.run.device), record


def run_search(label, weights, ctx, evaluated):
    """One search, logged to history_{label}.jsonl, then its top-k finalists: (student, record, history, seconds)."""
    args, path = ctx.args, os.path.join(ctx.run.dir, f"history_{label}.jsonl")
    stored = read_records(path, check_record, "candidate", "RoSearch history.jsonl") if os.path.isfile(path) else {}
    evaluated.update({r["hash"]: r for r in stored.values()})
    if stored:
        print(f"[{label}] resuming: {len(stored)} stored candidates", flush=True)
    best = [float("-inf")]

    def evaluate(genotype, index):
        key = genotype_hash(genotype)
        if key not in evaluated:  # the searches share evaluations: a genotype's R, A, E do not depend on weights
            evaluated[key] = train_and_score(genotype, ctx, args.proxy_epochs, f"search/{key}")[1]
            ctx.trained_candidates += 1
        return evaluated[key]  # evolve() sets index, fitness, genotype and hash on its own copy

    def on_record(r):
        if r["index"] not in stored:
            append_jsonl(log, r)
        best[0] = max(best[0], r["fitness"])
        ctx.run.log({f"charts/{label}_fitness": r["fitness"], f"charts/{label}_best_fitness": best[0],
                     f"robust/{label}_R": r["R"], f"eval/{label}_A": r["A"],
                     f"charts/{label}_majority_share": r.get("majority_share", 0),
                     f"charts/{label}_non_embedding_params": r["params"]["non_embedding"]}, r["index"])
        print(f"[{label} {r['index'] + 1}/{args.population + args.cycles}] {r['hash']} K={len(r['genotype']['cells'])}"
              f" H={r['genotype']['hidden']} A {r['A']:.1f} R {r['R']:.1f}"
              f"{'' if r.get('R_credit', r['R']) == r['R'] else ' (below floor)'} "
              f"x{r['compression'][ctx.space.basis]:.1f} F {r['fitness']:.2f}", flush=True)

    with open(path, "w") as log:  # the valid stored lines first (a cut last line is dropped), then each new one
        log.writelines(json.dumps(stored[i]) + "\n" for i in sorted(stored))
        history = evolve(ctx.space, args, weights, evaluate, stored, on_record, random_search=label == "random-search")
    finalists, cost = [], sum(r["kd_seconds"] + r["probe_seconds"] for r in history)  # shared ones count too
    for record in sorted(history, key=lambda r: -r["fitness"])[: args.top_k]:  # hashes are unique in a history
        student, final = trained(record["genotype"], ctx, f"final/{record['hash']}")
        cost += final["kd_seconds"] + final["probe_seconds"]
        final = {**final, "hash": record["hash"], "genotype": record["genotype"]}
        final["fitness"] = fitness(final, weights)
        print(f"[{label} final] {record['hash']} A {final['A']:.1f} R {final['R']:.1f} F {final['fitness']:.2f}",
              flush=True)
        finalists.append((student, final))
    return (*max(finalists, key=lambda f: f[1]["fitness"]), history, cost)  # the first of equal ones


class Context(Distillation):
    """Stage 1: run folder, data, teacher and rows (finetune.Distillation); search space, accuracy floor, probe set."""

    def __init__(self, args):
        args = validate(args)
        run = start_run(args, METHOD, also_attacks=[args.fitness_attack] if args.fitness_attack != "pgd" else [],
                        resume=args.resume, free=RESUME_FREE)
        super().__init__(args, METHOD, run, raw=args.bench and args.teacher is None)
        block = self.teacher.base_model.embeddings
        emb = count_params(block)  # the block a "teacher"-embeddings student shares: tables + its LayerNorm
        student = dict(embed_dim=block.word_embeddings.embedding_dim, num_labels=self.data.num_labels, heads=args.heads,
                       combine=args.cell_combine, residual=args.cell_residual, dropout=args.dropout,
                       folded=args.student_embeddings == "folded")
        self.space = Space(args.ops_list, args.min_cells, args.max_cells, args.hidden_list, student,
                           count_params(self.teacher), emb["total"], emb["total"] - emb["non_embedding"],
                           args.compression_basis, args.min_compression)
        self.space.check()
        self.floor = args.accuracy_floor * self.teacher_dev  # in %
        self.set_probe(args.probe_examples, args.probe_seed, args.fitness_attack, args.probe_pgd_radius)
        self.trained_candidates = 0  # candidates KD-trained in this process (a resume replays the stored ones)


def main(args):
    ctx = Context(args)
    args, run = ctx.args, ctx.run
    wanted = list(dict.fromkeys(["rosearch"] + args.rows))  # RoSearch first; a row named twice runs once
    # Stage 2: the searches and their finalists, all saved before any test attack (a resume skips what is done).
    # accuracy-only: w_r's weight moved to A; random-search: RoSearch's fitness over P + C uniform random genotypes
    searches = {"rosearch": args.weights, "accuracy-only": [0.0, args.weights[0] + args.weights[1], args.weights[2]],
                "random-search": args.weights}
    evaluated = {}  # genotype hash -> its record, shared by the searches
    picked = {name: run_search(name, w, ctx, evaluated) for name, w in searches.items() if name in wanted}
    if "handmade" in wanted:  # a residual conv3 stack: node j = conv3(previous state) + identity(previous state)
        cells = [[[[j + 1, "conv3"], [j + 1, "identity"]] for j in range(NODES)] for _ in range(args.handmade_cells)]
        student, record = trained({"hidden": args.hidden_list[0], "cells": cells}, ctx, "handmade")
        picked["handmade"] = (student, record, None, record["kd_seconds"] + record["probe_seconds"])
    # Stage 3: every row on test with the full attack set (each row saved as it finishes)
    rows = []
    for name in wanted:
        if name == "teacher":
            rows.append(ctx.row(name, ROWS[name], ctx.teacher, ctx.teacher_dev))
            continue
        student, best, history, cost = picked[name]
        student = student.fold()  # the exported student is what is counted, attacked and timed
        extra = {"genotype": student.genotype, "best": best}
        if history is not None:
            extra.update(candidates=len(history), history=f"history_{name}.jsonl")
            student.save(os.path.join(run.dir, f"student_{name}.pt"), ctx.space.student, best)
        rows.append(ctx.row(name, ROWS[name], student, best["A"], extra))
        rows[-1]["wall_clock"]["search_and_final"] = cost  # KD + probe seconds of its candidates and finalists
    ctx.finish(rows, fitness_weights=args.weights, fitness_attack=args.fitness_attack,
               teacher_dev_accuracy=ctx.teacher_dev, accuracy_floor=ctx.floor, compression_basis=args.compression_basis,
               trained_candidates=ctx.trained_candidates)


if __name__ == "__main__":
    with usage_errors():
        cli = parse_args()
        (bench_rosearch if cli.bench else main)(cli)
