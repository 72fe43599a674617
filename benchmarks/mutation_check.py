"""Mutation check: one deliberate bug at a time in the core, and the tests that must notice it.

Each :class:`Mutant` names a file, an exact snippet of it, the one-line bug that replaces the
snippet, and the default-suite tests that should fail. For every mutant the script copies the
working tree to a temporary folder (other processes may be importing the package from the
real one), applies the bug there, runs the tests with ``PYTHONPATH`` on the copy, and puts the
snippet back. A mutant is *killed* when the tests fail (or cannot even be collected); it
*survives* when they pass. The tests are first run once on the unchanged copy: a mutant
killed by tests that fail anyway would prove nothing.

Usage::

    python -m benchmarks.mutation_check                 # every mutant; a table, exit 1 if one survives
    python -m benchmarks.mutation_check --list          # the mutants and their tests
    python -m benchmarks.mutation_check --only NAME     # one (repeatable, or comma-separated)
    python -m benchmarks.mutation_check --json out.json

When the code is refactored a snippet may no longer be found: the script then stops before
running anything and names the mutant, its file and the snippet (``tests/test_mutation_check.py``
checks this in the default suite). Update the snippet (or the file) in :data:`MUTANTS`; add a
mutant with every feature that has a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: What a copy of the tree holds when it is not a git checkout.
FALLBACK_PATHS = ("pyproject.toml", "cellvit_ssl", "tests", "benchmarks", "configs", "napari_plugin")


@dataclass(frozen=True)
class Mutant:
    """One deliberate bug.

    Attributes:
        name: Short unique name (``--only``).
        area: What it breaks (objective, centring, views, readers, ...).
        file: Path relative to the repository root.
        original: Exact text in ``file``; must occur exactly once.
        replacement: The buggy text put in its place.
        tests: pytest node ids or files (relative to the root) that must fail; the likeliest first.
        bug: What the bug means, in words.
    """

    name: str
    area: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]
    bug: str


T_OBJ_REF = "tests/test_reference_objective.py"
T_SSL = "tests/test_ssl.py"
T_VIT_REF = "tests/test_reference_vit.py"
T_EMBED_PRE = "tests/test_embed.py::test_embed_is_the_model_on_the_training_preprocessing"
T_EMBED_VIEW = "tests/test_embed.py::test_samples_are_resized_to_the_view_size_the_model_trained_on"

MUTANTS: list[Mutant] = [
    # --- objective ------------------------------------------------------------------------
    Mutant("dino_drops_local_views", "objective", "cellvit_ssl/ssl.py",
           "s_logits = s_logits + student.dino_head(local_cls).chunk(n_local)",
           "s_logits = s_logits",
           (T_OBJ_REF,), "the local crops never reach the DINO loss"),
    Mutant("ibot_student_sees_unmasked", "objective", "cellvit_ssl/ssl.py",
           "s_feats = student.backbone.forward_features(g, g_ids, g_present, masks=masks)",
           "s_feats = student.backbone.forward_features(g, g_ids, g_present, masks=None)",
           (T_OBJ_REF,), "the student gets the unmasked global views, so iBOT has nothing to predict"),
    Mutant("koleo_over_both_views_at_once", "objective", "cellvit_ssl/ssl.py",
           'terms["koleo"] = sum(self.koleo_loss(c) for c in s_cls.chunk(n_global))',
           'terms["koleo"] = self.koleo_loss(s_cls)',
           (T_OBJ_REF,), "KoLeo over both global views together instead of per view (a view's twin is its neighbour)"),
    Mutant("loss_weights_ignored", "objective", "cellvit_ssl/ssl.py",
           "loss = sum(weights[k] * v for k, v in terms.items())",
           "loss = sum(terms.values())",
           (T_OBJ_REF,), "ssl.*_loss_weight have no effect"),
    Mutant("teacher_temp_no_warmup", "objective", "cellvit_ssl/ssl.py",
           "if epoch < c.warmup_teacher_temp_epochs:",
           "if False:",
           (T_OBJ_REF,), "the teacher temperature skips its warm-up"),
    Mutant("ibot_teacher_temp_not_scheduled", "objective", "cellvit_ssl/ssl.py",
           'tokens.view(-1, h, w), teacher_temp=temp)',
           'tokens.view(-1, h, w), teacher_temp=self.cfg.teacher_temp)',
           (T_OBJ_REF,), "iBOT uses the final teacher temperature during the warm-up"),
    Mutant("ema_direction_reversed", "objective", "cellvit_ssl/ssl.py",
           "update_momentum(self.student, self.teacher, m)",
           "update_momentum(self.teacher, self.student, m)",
           (f"{T_SSL}::test_update_teacher_is_an_ema_of_backbone_and_both_heads",),
           "the EMA pulls the student towards the teacher"),
    Mutant("mean_centre_frozen", "centring", "cellvit_ssl/ssl.py",
           "warmup_teacher_temp_epochs=cfg.warmup_teacher_temp_epochs,\n"
           "                    student_temp=cfg.student_temp,\n"
           "                    center_momentum=cfg.center_momentum,",
           "warmup_teacher_temp_epochs=cfg.warmup_teacher_temp_epochs,\n"
           "                    student_temp=cfg.student_temp,\n                    center_momentum=1.0,",
           (T_OBJ_REF,), "mean centring never moves its centre"),
    # --- Sinkhorn-Knopp centring ----------------------------------------------------------
    Mutant("sinkhorn_not_used", "centring", "cellvit_ssl/ssl.py",
           'self.sinkhorn = cfg.centering == "sinkhorn_knopp"',
           "self.sinkhorn = False",
           (f"{T_SSL}::test_sinkhorn_terms_equal_a_float64_reference",),
           "ssl.centering=sinkhorn_knopp silently falls back to the softmax"),
    Mutant("sinkhorn_no_iterations", "centring", "cellvit_ssl/centering.py",
           "for _ in range(n_iterations):",
           "for _ in range(0):",
           (f"{T_SSL}::test_sinkhorn_marginals_are_uniform_and_rows_sum_to_one",
            f"{T_SSL}::test_sinkhorn_matches_float64_reference"),
           "Sinkhorn-Knopp without its iterations is a plain softmax over the batch"),
    Mutant("sinkhorn_ignores_temperature", "centring", "cellvit_ssl/centering.py",
           "log_q = [(x.float() / temperature).t() for x in logits]",
           "log_q = [x.float().t() for x in logits]",
           (f"{T_SSL}::test_sinkhorn_matches_float64_reference",), "the teacher temperature is ignored"),
    Mutant("sinkhorn_prototype_mass_per_rank", "centring", "cellvit_ssl/centering.py",
           "mass = all_reduce_sum_(torch.cat([q.exp().sum(dim=1) for q in log_q])).split(widths)",
           "mass = torch.cat([q.exp().sum(dim=1) for q in log_q]).split(widths)",
           (f"{T_SSL}::test_sinkhorn_two_gloo_processes_equal_one_process_on_the_whole_batch",),
           "under DDP each rank balances prototypes over its own samples only"),
    # --- views ----------------------------------------------------------------------------
    Mutant("channel_drop_hits_protected", "views", "cellvit_ssl/transforms.py",
           "keep[self.protected] = True",
           "keep[self.protected] = keep[self.protected]",
           ("tests/test_transforms.py::test_channel_drop_never_empties_and_never_drops_the_protected_channel",),
           "channel drop may remove a protected channel"),
    Mutant("channel_drop_may_empty", "views", "cellvit_ssl/transforms.py",
           "if not keep.any():  # only reachable without protected channels",
           "if False:",
           ("tests/test_transforms.py::test_channel_drop_without_protection_keeps_one_channel",),
           "channel drop may zero every channel"),
    Mutant("cpu_views_no_hflip", "views", "cellvit_ssl/transforms.py",
           "v2.RandomHorizontalFlip(cfg.hflip_prob),",
           "v2.RandomHorizontalFlip(0.0),",
           ("tests/test_gpu_views.py::test_flip_and_rotation_frequencies_match",),
           "the CPU views are never flipped horizontally"),
    Mutant("cpu_views_crop_scale_ignored", "views", "cellvit_ssl/transforms.py",
           "crop = cropper(size, scale=tuple(scale), ratio=tuple(cfg.crop_ratio), antialias=True)",
           "crop = cropper(size, ratio=tuple(cfg.crop_ratio), antialias=True)",
           ("tests/test_gpu_views.py::test_crop_distribution_matches_cpu",),
           "the CPU crops ignore views.*_crop_scale"),
    Mutant("cpu_views_crop_ratio_ignored", "views", "cellvit_ssl/transforms.py",
           "crop = cropper(size, scale=tuple(scale), ratio=tuple(cfg.crop_ratio), antialias=True)",
           "crop = cropper(size, scale=tuple(scale), antialias=True)",
           ("tests/test_gpu_views.py::test_crop_ratio_holds_for_both_view_makers",),
           "the CPU crops ignore views.crop_ratio"),
    Mutant("gpu_views_crop_ratio_ignored", "views", "cellvit_ssl/gpu_views.py",
           "ratio=self.ratio, centred=self.centred)",
           "centred=self.centred)",
           ("tests/test_gpu_views.py::test_crop_ratio_holds_for_both_view_makers",),
           "the device crops ignore views.crop_ratio"),
    Mutant("cpu_views_crop_anchor_ignored", "views", "cellvit_ssl/transforms.py",
           'cropper = CentredRandomResizedCrop if cfg.crop_anchor == "centre" else v2.RandomResizedCrop',
           "cropper = v2.RandomResizedCrop",
           ("tests/test_gpu_views.py::test_centre_anchor_keeps_the_centre_in_every_crop_of_both_view_makers",),
           "the CPU crops ignore views.crop_anchor"),
    Mutant("gpu_views_crop_anchor_ignored", "views", "cellvit_ssl/gpu_views.py",
           'self.centred = cfg.crop_anchor == "centre"',
           "self.centred = False",
           ("tests/test_gpu_views.py::test_centre_anchor_keeps_the_centre_in_every_crop_of_both_view_makers",),
           "the device crops ignore views.crop_anchor"),
    Mutant("cell_target_ignored", "objective", "cellvit_ssl/ssl.py",
           "if self.cfg.cell_target and cls.shape[0] != present.shape[0]:",
           "if False and cls.shape[0] != present.shape[0]:",
           ("tests/test_ssl.py::test_cell_target_feeds_each_images_mean_channel_token_to_the_dino_heads",),
           "ssl.cell_target leaves DINO on every channel's token"),
    Mutant("gpu_views_flip_probs_swapped", "views", "cellvit_ssl/gpu_views.py",
           "views = flip_rotate(views, u[:, 0] < self.hflip_prob, u[:, 1] < self.vflip_prob, k)",
           "views = flip_rotate(views, u[:, 0] < self.vflip_prob, u[:, 1] < self.hflip_prob, k)",
           ("tests/test_gpu_views.py::test_flips_only_without_rot90",),
           "GPU views use the vertical flip probability for horizontal flips and vice versa"),
    Mutant("gpu_views_no_rot90", "views", "cellvit_ssl/gpu_views.py",
           "k = torch.floor(u[:, 2] * 4) if self.rot90 else torch.zeros_like(u[:, 2])",
           "k = torch.zeros_like(u[:, 2])",
           ("tests/test_gpu_views.py::test_flip_and_rotation_frequencies_match",),
           "GPU views are never rotated"),
    Mutant("gpu_views_crop_at_top", "views", "cellvit_ssl/gpu_views.py",
           "top = top_low + torch.minimum(torch.floor(u_top * (top_high - top_low + 1)), top_high - top_low)",
           "top = torch.zeros_like(h)",
           ("tests/test_gpu_views.py::test_crop_boxes_follow_torchvision_sampler",
            "tests/test_gpu_views.py::test_crop_distribution_matches_cpu"),
           "GPU crops always start at the top edge"),
    Mutant("gpu_views_jitter_shared_by_channels", "views", "cellvit_ssl/gpu_views.py",
           "scale = 1 + on * (u[:, 1 : 1 + channels] * 2 - 1) * contrast",
           "scale = 1 + on * (u[:, 1:2] * 2 - 1) * contrast",
           ("tests/test_gpu_views.py::test_jitter_moments_and_channel_independence",),
           "GPU contrast jitter is one draw shared by all channels"),
    # --- readers --------------------------------------------------------------------------
    Mutant("chammi_tape_folded_wrong", "readers", "cellvit_ssl/data/readers.py",
           "folded = plane.reshape(h, c, w).transpose(1, 0, 2)",
           "folded = plane.reshape(c, h, w)",
           ("tests/test_data_readers.py::test_chammi_png_tape_folds_channels",),
           "a CHAMMI tape is cut into horizontal bands instead of side-by-side channels"),
    Mutant("ome_tiff_names_from_ids", "readers", "cellvit_ssl/data/readers.py",
           'return [str(c.get("Name", "")) for c in chans] or None',
           'return [str(c.get("ID", "")) for c in chans] or None',
           ("tests/test_data_readers.py::test_ome_tiff_with_z_and_names", "tests/test_readers.py"),
           "OME-TIFF channel names are taken from the channel IDs"),
    Mutant("ome_zarr_names_ignored", "readers", "cellvit_ssl/data/readers.py",
           'names = [c.get("label", "") for c in attrs["omero"].get("channels", [])] or None',
           "names = None",
           ("tests/test_readers.py", "tests/test_data_readers.py::test_ome_zarr_pyramid_two_levels"),
           "OME-Zarr omero channel labels are not read"),
    Mutant("z_slice_ignored", "readers", "cellvit_ssl/data/readers.py",
           'index["Z"] = slice(None) if self.z == "max" else int(self.z)',
           'index["Z"] = slice(None) if self.z == "max" else 0',
           ("tests/test_data_readers.py",),
           "a chosen Z slice reads slice 0"),
    Mutant("z_projection_is_min", "readers", "cellvit_ssl/data/readers.py",
           'data = data.max(axis=kept.index("Z"))',
           'data = data.min(axis=kept.index("Z"))',
           ("tests/test_data_readers.py",),
           "the Z maximum projection is a minimum projection"),
    Mutant("t_frame_ignored", "readers", "cellvit_ssl/data/readers.py",
           'index: dict[str, Any] = {"C": c, "Y": y, "X": x, "T": self.t}',
           'index: dict[str, Any] = {"C": c, "Y": y, "X": x, "T": 0}',
           ("tests/test_data_readers.py::test_imagej_hyperstack_names_max_projection_slice_and_frame",),
           "a chosen time frame reads frame 0"),
    # --- backbone: position embeddings, pretrained weights, token layout -------------------
    Mutant("pos_embed_offset_ignored", "position embeddings", "cellvit_ssl/models/vit.py",
           "offset=self.spec.interpolate_offset",
           "offset=0.0",
           (T_VIT_REF,), "interpolate_offset=0.1 no longer gives DINOv2's resize (issue 23's mutant)"),
    Mutant("pos_embed_antialias_ignored", "position embeddings", "cellvit_ssl/models/vit.py",
           "antialias=self.spec.interpolate_antialias,",
           "antialias=False,",
           (T_VIT_REF,), "interpolate_antialias=true is ignored (DINOv2 register models, timm)"),
    Mutant("pretrained_chunked_keys_kept", "backbone", "cellvit_ssl/models/pretrained.py",
           'return f"blocks.{match[1]}.{match[2]}" if match else key',
           "return key",
           (T_VIT_REF,), "block-chunked DINOv2 keys (blocks.0.N.*) are not mapped to blocks.N.*"),
    Mutant("registers_before_cls", "backbone", "cellvit_ssl/models/vit.py",
           "tokens = torch.cat([tokens[:, :1], regs, tokens[:, 1:]], dim=1)",
           "tokens = torch.cat([regs, tokens], dim=1)",
           (T_VIT_REF,), "register tokens go before the CLS token (DINOv2 puts them after it)"),
    Mutant("swiglu_gate_halves_swapped", "backbone", "cellvit_ssl/models/layers.py",
           "a, b = self.w12(x).chunk(2, dim=-1)",
           "b, a = self.w12(x).chunk(2, dim=-1)",
           (T_VIT_REF,), "SwiGLU gates the wrong half of w12 (DINOv2 checkpoints give other features)"),
    Mutant("pretrained_grid_resize_not_antialiased", "position embeddings", "cellvit_ssl/models/pretrained.py",
           "patch = resample_grid(value[:, 1:], (side, side), backbone.native_grid, antialias=True)",
           "patch = resample_grid(value[:, 1:], (side, side), backbone.native_grid, antialias=False)",
           (T_VIT_REF,), "a checkpoint's position grid is resampled at load unlike timm's loader"),
    Mutant("pretrained_grey_kernel_mean", "backbone", "cellvit_ssl/models/pretrained.py",
           "grey = weight.sum(dim=1, keepdim=True)",
           "grey = weight.mean(dim=1, keepdim=True)",
           (T_VIT_REF,), "RGB kernels folded to grey by the mean: a grey image gives a third of the response"),
    # --- checkpoint resume ----------------------------------------------------------------
    Mutant("resume_skips_rng_restore", "checkpoint resume", "cellvit_ssl/train.py",
           "set_rng_state(rngs[self.info.rank])",
           "pass",
           ("tests/test_train_resume.py::test_sigkill_at_a_random_step_then_resume_equals_the_uninterrupted_run",),
           "a resumed run does not restore the random state"),
    Mutant("rng_restore_skips_torch", "checkpoint resume", "cellvit_ssl/checkpoint.py",
           'torch.set_rng_state(state["torch"].cpu())',
           "pass",
           ("tests/test_checkpoint.py::test_rng_state_survives_a_weights_only_round_trip",),
           "the torch CPU generator is not restored"),
    # --- channel masks --------------------------------------------------------------------
    Mutant("hierarchical_mask_ignored", "channel masks", "cellvit_ssl/models/hierarchical.py",
           "out = self.attn(self.norm(seq), attn_mask=mask)",
           "out = self.attn(self.norm(seq), attn_mask=None)",
           ("tests/test_models.py::test_joint_variants_ignore_absent_channels",),
           "hierarchical cross-channel attention attends to absent channels"),
    Mutant("channelvit_mask_ignored", "channel masks", "cellvit_ssl/models/channelvit.py",
           "attn_mask = keep[:, None, None, :]",
           "attn_mask = None",
           ("tests/test_models.py::test_joint_variants_ignore_absent_channels",),
           "channelvit attends to absent channels"),
    Mutant("boc_absent_block_not_zero", "channel masks", "cellvit_ssl/models/base.py",
           "out = values.new_zeros(b, len(self.channels), values.shape[-1])",
           "out = values.new_ones(b, len(self.channels), values.shape[-1])",
           ("tests/test_models.py::test_boc_absent_channel_is_a_zero_block_and_changes_nothing_else",),
           "bag-of-channels fills an absent channel's block with ones"),
    Mutant("fixed_absent_channel_not_zero", "channel masks", "cellvit_ssl/models/channels.py",
           "out = x.new_zeros(x.shape[0], len(self.channels), *x.shape[2:])",
           "out = x.new_ones(x.shape[0], len(self.channels), *x.shape[2:])",
           ("tests/test_models.py::test_fixed_reorders_channels_by_id_and_zero_fills_absent",),
           "fixed feeds an absent channel as ones"),
    Mutant("channel_sampling_may_empty", "channel masks", "cellvit_ssl/models/sampling.py",
           "k = (torch.rand(b, generator=generator, device=device) * counts).long().clamp(max=counts - 1) + 1",
           "k = (torch.rand(b, generator=generator, device=device) * counts).long().clamp(max=counts - 1)",
           ("tests/test_models.py::test_channel_sampling_draws_counts_uniformly_and_never_empties",),
           "hierarchical channel sampling may draw no channel"),
    # --- embed preprocessing --------------------------------------------------------------
    Mutant("embed_percentiles_ignored", "embed preprocessing", "cellvit_ssl/preprocess.py",
           "out[present] = normalize_percentiles(kept, *self.percentiles, source=source)",
           "out[present] = normalize_percentiles(kept, 0.0, 100.0, source=source)",
           (T_EMBED_PRE,),
           "Encoder.embed normalises with min/max instead of data.normalize_percentiles"),
    Mutant("embed_no_resize", "embed preprocessing", "cellvit_ssl/preprocess.py",
           'samples = F.interpolate(samples, size=size, mode="bilinear", antialias=True, align_corners=False)',
           "samples = samples",
           (T_EMBED_VIEW, "tests/test_parity.py"),
           "Encoder.embed feeds images at their own size instead of the training crop size"),
    Mutant("embed_resize_aliased", "embed preprocessing", "cellvit_ssl/preprocess.py",
           'samples = F.interpolate(samples, size=size, mode="bilinear", antialias=True, align_corners=False)',
           'samples = F.interpolate(samples, size=size, mode="bilinear", antialias=False, align_corners=False)',
           (T_EMBED_VIEW,),
           "Encoder.embed shrinks images without antialiasing"),
    # --- dataset normalisation ------------------------------------------------------------
    Mutant("dataset_percentile_norm_skipped", "dataset normalisation", "cellvit_ssl/preprocess.py",
           "out[present] = normalize_percentiles(kept, *self.percentiles, source=source)",
           "out[present] = kept",
           ("tests/test_data_dataset.py",),
           "data.normalize=percentile leaves raw intensities"),
    Mutant("dataset_stats_ignored", "dataset normalisation", "cellvit_ssl/preprocess.py",
           "out[present] = normalize_with_bounds(kept, lo, hi)",
           "out[present] = normalize_percentiles(kept, *self.percentiles, source=source)",
           ("tests/test_data_dataset.py",),
           "data.normalize=dataset normalises each sample by its own percentiles"),
    Mutant("percentiles_pooled_over_channels", "dataset normalisation", "cellvit_ssl/data/normalize.py",
           "lo, hi = np.percentile(image, [low, high], axis=(1, 2), keepdims=True)",
           "lo, hi = np.percentile(image, [low, high], keepdims=True)",
           ("tests/test_data_dataset.py::test_percentile_normalisation_matches_reference",),
           "percentiles are taken over all channels together"),
    Mutant("normalisation_not_clipped", "dataset normalisation", "cellvit_ssl/data/normalize.py",
           "return np.clip(np.nan_to_num(scaled, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0).astype(np.float32)",
           "return np.nan_to_num(scaled, nan=0.0, posinf=1.0, neginf=0.0).astype(np.float32)",
           ("tests/test_data_dataset.py::test_percentile_normalisation_matches_reference",),
           "intensities beyond the percentiles are not clipped to [0, 1]"),
    # --- one sample path, the preprocessing contract, the channel vocabulary --------------
    Mutant("embed_reads_another_level", "sample path", "cellvit_ssl/embed.py",
           "level=data.level, z=data.z_slice",
           "level=0, z=data.z_slice",
           ("tests/test_parity.py",),
           "embed reads the full-resolution level of a pyramid a model was trained on at another level"),
    Mutant("fit_not_antialiased", "preprocessing contract", "cellvit_ssl/preprocess.py",
           'size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]',
           'size=(nh, nw), mode="bilinear", antialias=False, align_corners=False)[0]',
           (T_EMBED_PRE,),
           "images are fitted into the sample size without antialiasing"),
    Mutant("checkpoint_contract_ignored", "preprocessing contract", "cellvit_ssl/encoder.py",
           'if "preprocess" in payload:',
           "if False:",
           ("tests/test_contract.py::test_dataset_statistics_come_from_the_checkpoint_in_a_fresh_process",),
           "the Encoder rebuilds the contract from the config and needs the training machine's statistics"),
    Mutant("curate_pooling_ignored", "curation", "cellvit_ssl/curate_features.py",
           'f"embed.pooling={pooling}",',
           "",
           ("tests/test_curate.py::test_checkpoint_features_take_the_embed_pooling",),
           "curation embeds with the default pooling whatever curate.embed.pooling says"),
    Mutant("padding_id_is_nucleus", "channel vocabulary", "cellvit_ssl/channels.py",
           "PAD_CHANNEL_ID = -1",
           "PAD_CHANNEL_ID = 0",
           ("tests/test_vocabulary.py::test_padding_id_is_no_channel_and_is_never_looked_up",),
           "padded channel positions carry nucleus's id"),
    Mutant("masked_channels_validated", "channel vocabulary", "cellvit_ssl/models/base.py",
           "unknown = present & (slots < 0)",
           "unknown = slots < 0",
           ("tests/test_vocabulary.py",),
           "padded channel ids are looked up, so a mixed batch fails on a model without that channel"),
    Mutant("channel_map_ignored", "channel vocabulary", "cellvit_ssl/channels.py",
           "key = _key(self._mapped.get(key, name))",
           "key = _key(name)",
           ("tests/test_vocabulary.py", "tests/test_data_errors.py"),
           "the user's data.channel_map is not consulted"),
]


def check_snippets(root: Path = ROOT, mutants: list[Mutant] | None = None) -> list[str]:
    """Problems with the mutant list: files or snippets not found exactly once, duplicate names."""
    mutants = MUTANTS if mutants is None else mutants
    problems = []
    names = [m.name for m in mutants]
    problems += [f"duplicate mutant name {n!r}" for n in sorted({n for n in names if names.count(n) > 1})]
    for m in mutants:
        path = root / m.file
        if not path.is_file():
            problems.append(f"{m.name}: file {m.file} does not exist")
            continue
        count = path.read_text().count(m.original)
        if count != 1:
            problems.append(f"{m.name}: snippet found {count} times in {m.file} (expected once): {m.original!r}")
        if m.original == m.replacement:
            problems.append(f"{m.name}: the replacement equals the original")
        for test in m.tests:
            if not (root / test.split("::")[0]).is_file():
                problems.append(f"{m.name}: test file {test.split('::')[0]} does not exist")
    return problems


def _tree_files(root: Path) -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=root,
                             capture_output=True, check=True)
        files = [f for f in out.stdout.decode().split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        files = []
    if files:
        return [f for f in files if (root / f).is_file()]
    return [str(p.relative_to(root)) for top in FALLBACK_PATHS for p in
            ([root / top] if (root / top).is_file() else (root / top).rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts]


def copy_tree(root: Path, dest: Path) -> None:
    """Copy the working tree's files (tracked and untracked, not ignored) under ``dest``."""
    for rel in _tree_files(root):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)


def _env(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy)  # the copy only: never the real tree
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a restored file must not meet the mutant's cached bytecode
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _check_import_location(copy: Path) -> None:
    out = subprocess.run([sys.executable, "-c", "import cellvit_ssl; print(cellvit_ssl.__file__)"], cwd=copy,
                         env=_env(copy), capture_output=True, text=True)
    where = out.stdout.strip()
    if out.returncode or not Path(where).resolve().is_relative_to(copy.resolve()):
        raise SystemExit(f"mutation_check: the copy's cellvit_ssl is not the one imported ({where or out.stderr})")


def run_tests(copy: Path, tests: list[str], timeout: float, stop_first: bool = True) -> dict:
    """Run pytest on ``tests`` in ``copy``; returns exit code, first failing test, seconds."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore", *tests]
    if stop_first:
        cmd.insert(4, "-x")
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=_env(copy), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"rc": None, "failed": f"timeout after {timeout:.0f} s", "seconds": time.perf_counter() - start,
                "tail": ""}
    failed = next((line.split(" - ")[0] for line in proc.stdout.splitlines()
                   if line.startswith(("FAILED ", "ERROR "))), "")
    return {"rc": proc.returncode, "failed": failed, "seconds": time.perf_counter() - start,
            "tail": (proc.stdout + proc.stderr)[-3000:]}


def verdict(result: dict) -> str:
    """``killed`` (tests failed, errored or hung), ``survived`` (passed) or ``error`` (nothing ran)."""
    rc = result["rc"]
    if rc is None or rc in (1, 2):  # failures, an interrupted collection (import error), a hang
        return "killed"
    return "survived" if rc == 0 else "error"


def mutate(copy: Path, mutant: Mutant) -> str:
    """Apply ``mutant`` in ``copy``; returns the original text to restore."""
    path = copy / mutant.file
    text = path.read_text()
    if text.count(mutant.original) != 1:
        raise SystemExit(f"mutation_check: {mutant.name}: snippet not found exactly once in {mutant.file}")
    path.write_text(text.replace(mutant.original, mutant.replacement))
    return text


def select(names: list[str] | None) -> list[Mutant]:
    if not names:
        return list(MUTANTS)
    wanted = [n for arg in names for n in arg.split(",") if n]
    known = {m.name: m for m in MUTANTS}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise SystemExit(f"mutation_check: unknown mutants {unknown}; --list shows them")
    return [known[n] for n in wanted]


def table(rows: list[dict]) -> str:
    head = f"{'mutant':38} {'area':22} {'verdict':9} {'s':>6}  killed by"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name']:38} {r['area']:22} {r['verdict']:9} {r['seconds']:6.1f}  {r['failed']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--only", action="append", help="run only these mutants (repeatable, comma-separated)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run (a hang is a kill)")
    parser.add_argument("--no-baseline", action="store_true", help="skip running the tests on the unchanged copy")
    args = parser.parse_args(argv)

    mutants = select(args.only)
    if args.list:
        for m in mutants:
            print(f"{m.name:38} {m.area:22} {m.file}\n    {m.bug}\n    tests: {' '.join(m.tests)}")
        return 0
    problems = check_snippets(ROOT, mutants)
    if problems:
        print("mutation_check: the mutant list no longer fits the code:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2

    rows: list[dict] = []
    started, load_start = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="cellvit_mutation_") as tmp:
        copy = Path(tmp) / "tree"
        copy_tree(ROOT, copy)
        _check_import_location(copy)
        if not args.no_baseline:
            union = list(dict.fromkeys(t for m in mutants for t in m.tests))
            base = run_tests(copy, union, args.timeout, stop_first=False)
            print(f"baseline: {len(union)} selections on the unchanged tree, rc={base['rc']}, {base['seconds']:.0f} s",
                  flush=True)
            if base["rc"] != 0:
                print(f"mutation_check: the selected tests fail without any mutant:\n{base['tail']}", file=sys.stderr)
                return 2
        for m in mutants:
            original = mutate(copy, m)
            try:
                result = run_tests(copy, list(m.tests), args.timeout)
            finally:
                (copy / m.file).write_text(original)
            row = {**asdict(m), "verdict": verdict(result), "failed": result["failed"], "rc": result["rc"],
                   "seconds": round(result["seconds"], 1)}
            if row["verdict"] != "killed":
                row["tail"] = result["tail"]
            rows.append(row)
            print(f"{m.name:38} {row['verdict']:9} {row['seconds']:6.1f} s  {row['failed']}", flush=True)

    print()
    print(table(rows))
    bad = [r for r in rows if r["verdict"] != "killed"]
    for r in bad:
        print(f"\n{r['name']} {r['verdict']}: {r['bug']}\n{r.get('tail', '')}", file=sys.stderr)
    print(f"\n{len(rows) - len(bad)}/{len(rows)} mutants killed")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp_json = args.json.with_suffix(args.json.suffix + ".tmp")
        env = {"python": sys.version.split()[0], "cpu_count": os.cpu_count(), "loadavg_start": load_start,
               "loadavg_end": os.getloadavg(), "total_seconds": round(time.perf_counter() - started)}
        tmp_json.write_text(json.dumps({"benchmark": "mutation_check", "env": env, "mutants": rows}, indent=1))
        os.replace(tmp_json, args.json)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
