"""The experiment's settings: one typed config, saved beside every result it produced."""

from __future__ import annotations

import dataclasses

from ..config import Config
from ..errors import UsageError
from ..features.graybox import DEFAULT_TIMESTEPS


@dataclasses.dataclass
class ExperimentConfig(Config):
    """Everything that decides the study's numbers. ``ExperimentConfig()`` is the full run that regenerates
    docs/RESULTS.md; ``ExperimentConfig.quick()`` is the smoke run the tests use."""

    # The bundled toy world, and the auxiliary set drawn from it (every member and non-member by default).
    n_members: int = 300
    n_nonmembers: int = 300
    data_seed: int = 0
    # Main feature settings (RQ1/RQ2); ablations vary one of them at a time.
    n_gen: int = 2
    steps: int = 20
    batch_size: int = 32  # captions per generate call
    attacks: tuple = ("I-P", "I-S", "II-P", "II-S", "III-X", "III-T", "IV")
    # Gray-box tier (RQ1, RQ3, set-level): its attacks, read at these timesteps, from stores of their own (the
    # black-box stores stay as they were); the RQ3 targets' set-level test runs graybox_set_attack beside IV.
    graybox_attacks: tuple = ("loss", "loss-score", "PIA", "PIA-score", "SecMI", "SecMI-score", "CLiD", "CLiD-score")
    graybox_timesteps: tuple = DEFAULT_TIMESTEPS
    graybox_set_attack: str = "PIA"
    # Verdicts at a small budget (RQ1, RQ3): cross-fitted heads (`audit train --folds`) on the same test rows as
    # the split heads, and stores with a reference model (`audit features --reference`): RQ1's bundled target
    # against reference_rq1; each RQ3 fine-tune against the model it was fine-tuned from (the bundled `toy`), the
    # untuned control against reference_rq1. Verdict thresholds at verdict_max_fpr.
    crossfit_folds: int = 5
    reference_rq1: str = "toy-base"
    verdict_rq3: tuple = ("weak", "strong")  # RQ3 targets that get cross-fitted and reference rows
    # The attacks (by base name, with their -score forms) of the cross-fitted and reference cells: the strongest
    # attack of each family the issue compares, which keeps the K-fold cells within the study's hour.
    verdict_attacks: tuple = ("II-P", "IV", "loss", "PIA", "CLiD")
    verdict_max_fpr: float = 0.01
    # Image-variation tier (RQ1 rows; RQ4 strength ablation: one store per strength, seed-0 queries).
    variation_attacks: tuple = ("var-pixel", "var-pixel-score", "var-clip", "var-clip-score", "var-all",
                                "var-all-score")
    var_strengths: tuple = (0.1, 0.2, 0.4)
    n_var: int = 2
    var_strength_grid: tuple = (0.05, 0.1, 0.2, 0.3, 0.4, 0.6)
    # RQ1/RQ3 seeds: seed s generates the images (features seed s) and draws the split and head initialisation.
    seeds: tuple = (0, 1, 2)
    # RQ4/RQ5: split/head seeds, on the seed-0 images.
    ablation_seeds: tuple = (0, 1, 2)
    # Head training (fields of audit.attacks.TrainConfig); fewer epochs than `audit train` to fit the hour.
    epochs: int = 60
    patience: int = 10
    n_boot: int = 200  # bootstrap resamples of each test-split CI
    # RQ4 grids.
    aux_fractions: tuple = (0.05, 0.1, 0.25, 0.5, 1.0)
    steps_grid: tuple = (5, 10, 20, 50)
    n_gen_grid: tuple = (1, 2, 4)
    # Second embedder: a CLIP trained here on another seed's public scenes, with another size.
    clip2_seed: int = 2
    clip2_public: int = 2000
    clip2_steps: int = 300
    clip2_batch: int = 64
    clip2_lr: float = 1e-3
    clip2_layers: int = 2
    clip2_hidden: int = 48
    # RQ3: the bundled target fine-tuned on new members (scenes of another world seed) for fewer or more steps.
    rq3_world_seed: int = 1
    rq3_members: int = 100
    rq3_nonmembers: int = 100
    rq3_finetune_steps: tuple = (100, 400)  # weak, strong
    rq3_batch: int = 50
    rq3_lr: float = 1e-3
    # RQ5 defences (audit.defences specs).
    defences: tuple = ("jpeg:75", "jpeg:30", "noise:8", "noise:24", "downscale:2", "downscale:4")
    # Set-level inference.
    set_ks: tuple = (1, 5, 10, 20)
    set_alpha: float = 0.05
    set_trials: int = 300  # random sets per k, seed and kind (member / non-member)
    set_method: str = "permutation"
    set_resamples: int = 200  # Monte Carlo draws per set test (a valid test for any number of draws)
    # Parallel worker processes (one torch thread each).
    workers: int = 2

    @classmethod
    def quick(cls) -> "ExperimentConfig":
        """Tiny settings that exercise every stage in well under two minutes (numbers are meaningless)."""
        return cls(
            n_members=12, n_nonmembers=12, n_gen=1, steps=2, batch_size=12, attacks=("II-S",),
            graybox_attacks=("PIA-score", "PIA"), graybox_timesteps=(100, 200), seeds=(0,),
            ablation_seeds=(0,), epochs=2, patience=2, n_boot=20, aux_fractions=(0.5, 1.0), steps_grid=(2, 3),
            n_gen_grid=(1, 2), clip2_public=64, clip2_steps=3, clip2_batch=16, rq3_members=8, rq3_nonmembers=8,
            rq3_finetune_steps=(1, 2), rq3_batch=4, defences=("downscale:2",), set_ks=(1, 2), set_trials=20,
            workers=2, crossfit_folds=2, verdict_rq3=("weak",), variation_attacks=("var-pixel-score", "var-all"),
            var_strengths=(0.5,), n_var=2, var_strength_grid=(0.5,),
        )

    def validate(self) -> "ExperimentConfig":
        from ..attacks import parse_attacks
        from ..defences import parse_defence

        parse_attacks(",".join(self.attacks))
        from ..attacks.inputs import tier_of
        from ..features.graybox import check_timesteps
        from ..features.variation import check_strengths
        from ..tiers import BLACK_BOX, GRAY_BOX, VARIATION

        if self.graybox_attacks:
            parse_attacks(",".join(self.graybox_attacks))
            check_timesteps(self.graybox_timesteps)
            if self.graybox_set_attack not in self.graybox_attacks:
                raise UsageError(f"graybox_set_attack {self.graybox_set_attack!r} is not one of graybox_attacks "
                                 f"{self.graybox_attacks}")
        if self.variation_attacks:
            parse_attacks(",".join(self.variation_attacks))
            check_strengths(self.var_strengths, self.steps)
            check_strengths(self.var_strength_grid, self.steps)
            if self.n_var < 1:
                raise UsageError(f"n_var must be >= 1, got {self.n_var}")
        wrong = [a for a in self.attacks if tier_of(a) != BLACK_BOX] + [
            a for a in self.graybox_attacks if tier_of(a) != GRAY_BOX] + [
            a for a in self.variation_attacks if tier_of(a) != VARIATION]
        if wrong:
            raise UsageError(f"attacks {wrong} are listed under another tier (attacks: black-box, "
                             "graybox_attacks: gray-box, variation_attacks: variation)")
        if self.crossfit_folds == 1 or self.crossfit_folds < 0:
            raise UsageError(f"crossfit_folds must be 0 (no cross-fitted rows) or at least 2, got "
                             f"{self.crossfit_folds}")
        if self.verdict_attacks:
            parse_attacks(",".join(self.verdict_attacks))
        if not set(self.verdict_rq3) <= {"untuned", "weak", "strong"}:
            raise UsageError(f"verdict_rq3 {self.verdict_rq3} must name RQ3 targets: untuned, weak, strong")
        if not 0 < self.verdict_max_fpr < 1:
            raise UsageError(f"verdict_max_fpr must be in (0, 1), got {self.verdict_max_fpr}")
        for spec in self.defences:
            parse_defence(spec)
        if self.n_gen not in self.n_gen_grid or self.steps not in self.steps_grid:
            raise UsageError(f"the main n_gen {self.n_gen} and steps {self.steps} must be in n_gen_grid "
                             f"{self.n_gen_grid} and steps_grid {self.steps_grid} (their cells are shared)")
        if 0 not in self.seeds or not set(self.ablation_seeds) <= set(self.seeds):
            raise UsageError(f"seeds {self.seeds} must include 0 and every ablation seed {self.ablation_seeds}")
        if not all(0 < f <= 1 for f in self.aux_fractions) or 1.0 not in self.aux_fractions:
            raise UsageError(f"aux_fractions {self.aux_fractions} must lie in (0, 1] and include 1.0")
        if len(self.rq3_finetune_steps) != 2 or not 0 < self.rq3_finetune_steps[0] < self.rq3_finetune_steps[1]:
            raise UsageError(f"rq3_finetune_steps must be (weak, strong) with 0 < weak < strong, got "
                             f"{self.rq3_finetune_steps}")
        if self.workers < 1:
            raise UsageError(f"workers must be >= 1, got {self.workers}")
        return self

    @property
    def base_n_gen(self) -> int:
        """Images per caption in the seed-0 store every n_gen cell is sliced from."""
        return max(self.n_gen_grid)
