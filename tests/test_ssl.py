"""The DINOv2 objective: each term against lightly's classes or a float64 reference; heads,
temperatures, last-layer freezing, EMA, switches and channel sampling."""

import math

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss

from cellvit_ssl import ConfigError, load_config
from cellvit_ssl.channels import channel_ids
from cellvit_ssl.models.channels import build_model
from cellvit_ssl.ssl import DINOMetaArch, mean_per_image

CHANNELS = ["nucleus", "protein", "er"]
TINY = [
    "model.arch=custom", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
    "model.patch_size=8", "model.img_size=32", "model.layerscale_init=null",
    "ssl.head_hidden_dim=64", "ssl.head_bottleneck_dim=16", "ssl.head_output_dim=96",
    "ssl.warmup_teacher_temp_epochs=3", "ssl.mask_sample_probability=1.0", "ssl.mask_ratio=[0.2,0.5]",
]


def make_meta(*overrides, seed=0):
    cfg = load_config(None, TINY + list(overrides))
    torch.manual_seed(seed)
    return DINOMetaArch(build_model(cfg.model, CHANNELS), cfg.ssl), cfg


def make_batch(b=4, n_local=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = len(CHANNELS)
    views = [torch.rand(b, c, 32, 32, generator=g) for _ in range(2)]
    views += [torch.rand(b, c, 16, 16, generator=g) for _ in range(n_local)]
    return views, torch.tensor([channel_ids(CHANNELS)] * b)


class Recorder:
    """Inputs and outputs of every call of some modules."""

    def __init__(self, **modules):
        self.calls = {name: [] for name in modules}
        for name, m in modules.items():
            m.register_forward_hook(lambda mod, inp, out, name=name: self.calls[name].append((inp[0], out)))


def record(meta):
    heads = {f"{who}_{name}": net[name] for who, net in (("student", meta.student), ("teacher", meta.teacher))
             for name in ("dino_head", "ibot_head") if name in net}
    rec = Recorder(**heads)
    rec.masks = []
    make = meta._masks

    def keep(*args):
        m = make(*args)
        rec.masks.append(m)
        return m

    meta._masks = keep
    return rec


def sinkhorn_reference(logits, temperature, n_iterations):
    """The textbook algorithm (DINOv2's), in float64."""
    q = torch.exp(logits.double() / temperature).t()
    q /= q.sum()
    k, b = q.shape
    for _ in range(n_iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).t()


# --- Sinkhorn-Knopp ----------------------------------------------------------------------

def test_sinkhorn_marginals_are_uniform_and_rows_sum_to_one():
    from cellvit_ssl.centering import sinkhorn_knopp

    torch.manual_seed(0)
    logits = torch.randn(256, 32)
    q = sinkhorn_knopp(logits, temperature=0.5, n_iterations=100)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(256), atol=1e-4, rtol=0)
    torch.testing.assert_close(q.sum(dim=0) / 256, torch.full((32,), 1 / 32), atol=1e-4 / 32, rtol=0)
    # It is a re-weighting of the teacher softmax, not something else with those marginals.
    assert (q.argmax(dim=1) == logits.argmax(dim=1)).float().mean() > 0.5


@pytest.mark.parametrize("n_iterations", [1, 3, 30])
@pytest.mark.parametrize("temperature", [0.04, 0.5])
def test_sinkhorn_matches_float64_reference(n_iterations, temperature):
    from cellvit_ssl.centering import sinkhorn_knopp

    torch.manual_seed(1)
    logits = torch.randn(64, 128).clamp(-2.5, 2.5)  # float64 reference must not overflow
    q = sinkhorn_knopp(logits, temperature, n_iterations)
    assert q.dtype == torch.float32
    torch.testing.assert_close(q.double(), sinkhorn_reference(logits, temperature, n_iterations),
                               atol=1e-6, rtol=1e-4)


def test_sinkhorn_survives_large_logits_and_empty_batches():
    from cellvit_ssl.centering import sinkhorn_knopp

    q = sinkhorn_knopp(torch.randn(16, 8) * 50, temperature=0.04)
    assert torch.isfinite(q).all()
    assert sinkhorn_knopp(torch.zeros(0, 8), temperature=0.1).shape == (0, 8)


def _sinkhorn_rank(rank, world, init_file, logits, out_dir):
    import torch.distributed as dist

    from cellvit_ssl.centering import sinkhorn_knopp

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        part = logits.chunk(world)[rank]
        torch.save(sinkhorn_knopp(part, temperature=0.1, n_iterations=3), f"{out_dir}/q{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sinkhorn_two_gloo_processes_equal_one_process_on_the_whole_batch(tmp_path):
    import torch.multiprocessing as mp

    from cellvit_ssl.centering import sinkhorn_knopp

    torch.manual_seed(2)
    logits = torch.randn(24, 40)
    # spawn, not fork: a child forked after an earlier test started an OpenMP thread pool hangs in it
    mp.start_processes(_sinkhorn_rank, args=(2, str(tmp_path / "init"), logits, str(tmp_path)), nprocs=2,
                       start_method="spawn")
    q_ranks = torch.cat([torch.load(tmp_path / f"q{r}.pt") for r in range(2)])
    q_single = sinkhorn_knopp(logits, temperature=0.1, n_iterations=3)
    torch.testing.assert_close(q_ranks, q_single, atol=1e-7, rtol=1e-6)
    # ... and not what each rank would get on its own half
    assert not torch.allclose(sinkhorn_knopp(logits[:12], 0.1, 3), q_single[:12], atol=1e-4)


def test_sinkhorn_jointly_solves_each_problem_as_on_its_own():
    from cellvit_ssl.centering import sinkhorn_knopp, sinkhorn_knopp_jointly

    torch.manual_seed(3)
    cls, patches = torch.randn(8, 40), torch.randn(30, 24)
    inputs = (cls.clone(), patches.clone())
    joint = sinkhorn_knopp_jointly([cls, patches], temperature=1.0, n_iterations=3)
    assert torch.equal(cls, inputs[0]) and torch.equal(patches, inputs[1]), "the logits are left as they are"
    joint = sinkhorn_knopp_jointly([cls, patches], temperature=0.1, n_iterations=3)
    for q, logits in zip(joint, (cls, patches)):
        torch.testing.assert_close(q, sinkhorn_knopp(logits, 0.1, 3), atol=0, rtol=0)
    with pytest.raises(ValueError, match="iteration"):
        sinkhorn_knopp(cls, 0.1, 0)


def _collectives_rank(rank, world, init_file, logits, out_dir):
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from cellvit_ssl import distributed as D
    from cellvit_ssl.centering import sinkhorn_knopp_jointly

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    info = D.DistInfo(rank, world, rank, torch.device("cpu"))
    real_all_reduce, calls = dist.all_reduce, []

    def counting_all_reduce(tensor, *args, **kwargs):
        calls.append((tuple(tensor.shape), str(kwargs.get("op", args[0] if args else "default"))))
        return real_all_reduce(tensor, *args, **kwargs)

    # the module attribute that cellvit_ssl.distributed and lightly's centre both call
    dist.all_reduce = counting_all_reduce
    try:
        result = {}
        for centering in ("sinkhorn_knopp", "mean"):
            meta, _ = make_meta(f"ssl.centering={centering}", "model.variant=hierarchical")
            model = D.wrap_model(meta, info, "ddp")
            optimizer = torch.optim.AdamW([p for p in meta.parameters() if p.requires_grad], lr=1e-3)
            result[centering] = []
            for step in range(2):  # one optimiser step: forward, backward, AdamW, EMA
                views, ids = make_batch(b=2, seed=10 * rank + step)
                start = len(calls)
                model(views, ids, epoch=0)["loss"].backward()
                optimizer.step()
                meta.update_teacher(0.9)
                result[centering].append(calls[start:])
        # two SK problems of uneven, here empty, per-rank parts
        cls, patches = logits
        parts = [cls.chunk(world)[rank], patches[:0] if rank == 0 else patches]
        result["joint"] = sinkhorn_knopp_jointly(parts, temperature=0.1, n_iterations=3)
        # FSDP shards every transformer block (cross-channel blocks included) and trains
        meta, _ = make_meta("model.variant=hierarchical")
        model = D.wrap_model(meta, info, "fsdp")
        result["fsdp_blocks"] = [isinstance(block, FSDPModule) for block in meta.transformer_blocks()]
        views, ids = make_batch(b=2, seed=rank)
        loss = model(views, ids, epoch=0)["loss"]
        loss.backward()
        result["fsdp_loss"] = float(loss)
        torch.save(result, f"{out_dir}/result{rank}.pt")
    finally:
        dist.all_reduce = real_all_reduce
        dist.destroy_process_group()


def test_sinkhorn_centring_issues_one_all_reduce_per_normalisation_and_no_centre(tmp_path):
    """Two gloo processes. Sinkhorn-Knopp: ``sinkhorn_iterations + 1`` all-reduces per step for DINO
    and iBOT together (one max, then one sum per prototype normalisation), none of a centre;
    mean centring: lightly's two centre all-reduces. Also: the joint SK of two ranks equals one
    process on the whole batch, and FSDP shards the cross-channel blocks too."""
    import torch.multiprocessing as mp

    from cellvit_ssl.centering import sinkhorn_knopp_jointly

    torch.manual_seed(4)
    logits = (torch.randn(12, 40), torch.randn(9, 24))
    mp.start_processes(_collectives_rank, args=(2, str(tmp_path / "init"), logits, str(tmp_path)), nprocs=2,
                       start_method="spawn")
    results = [torch.load(tmp_path / f"result{r}.pt") for r in range(2)]
    _, cfg = make_meta()
    n, k = cfg.ssl.sinkhorn_iterations, cfg.ssl.head_output_dim
    for result in results:
        for step in result["sinkhorn_knopp"]:
            assert [shape for shape, _ in step] == [(k + k,)] * (n + 1), step  # DINO's and iBOT's prototypes
            assert [op.rsplit(".", 1)[-1] for _, op in step] == ["MAX"] + ["SUM"] * n, step
        for step in result["mean"]:
            assert sorted(shape for shape, _ in step) == [(1, 1, k), (1, k)], step  # lightly's two centres
        assert len(result["fsdp_blocks"]) == 2 * 2 * 2 and all(result["fsdp_blocks"])
        assert math.isfinite(result["fsdp_loss"])
    single = sinkhorn_knopp_jointly(list(logits), temperature=0.1, n_iterations=3)
    torch.testing.assert_close(torch.cat([r["joint"][0] for r in results]), single[0], atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(results[1]["joint"][1], single[1], atol=1e-7, rtol=1e-6)
    assert results[0]["joint"][1].shape == (0, 24)


# --- loss terms against lightly's classes (mean centering) ----------------------------------

def test_terms_equal_lightly_losses_on_the_same_outputs_with_mean_centering():
    meta, cfg = make_meta("ssl.centering=mean", "ssl.center_momentum=0.8", "ssl.warmup_teacher_temp=0.04",
                          "ssl.teacher_temp=0.07")
    rec = record(meta)
    views, ids = make_batch()
    epoch = 1
    out = meta(views, ids, epoch=epoch)
    temp = meta.teacher_temperature(epoch)
    assert temp == pytest.approx(0.055)
    (t_in, t_dino), = rec.calls["teacher_dino_head"]
    (s_cls, s_glob), (_, s_loc) = rec.calls["student_dino_head"]
    s = cfg.ssl
    dino = DINOLoss(output_dim=96, warmup_teacher_temp=s.warmup_teacher_temp, teacher_temp=s.teacher_temp,
                    warmup_teacher_temp_epochs=s.warmup_teacher_temp_epochs, student_temp=s.student_temp,
                    center_momentum=s.center_momentum)
    ref = dino(list(t_dino.chunk(2)), list(s_glob.chunk(2)) + list(s_loc.chunk(2)), epoch=epoch)
    torch.testing.assert_close(out["dino"], ref.detach())
    torch.testing.assert_close(meta.dino_loss.center, dino.center)  # the centre moved the same way

    (_, t_patch), = rec.calls["teacher_ibot_head"]
    (_, s_patch), = rec.calls["student_ibot_head"]
    masks = torch.cat(rec.masks)
    assert masks.shape == (2 * 4 * 3, 16) and masks.any(dim=1).all()  # every sample masked (p=1)
    ibot = IBOTPatchLoss(output_dim=96, teacher_temp=s.teacher_temp, student_temp=s.student_temp,
                         center_momentum=s.center_momentum)
    ref_ibot = ibot(t_patch, s_patch, masks.view(-1, 4, 4), teacher_temp=temp)
    torch.testing.assert_close(out["ibot"], ref_ibot.detach())

    koleo = sum(KoLeoLoss()(c) for c in s_cls.chunk(2))
    torch.testing.assert_close(out["koleo"], koleo.detach())
    total = out["dino"] + out["ibot"] + 0.1 * out["koleo"]
    torch.testing.assert_close(out["loss"].detach(), total)


def test_ibot_masks_follow_the_configured_ratio_range():
    meta, _ = make_meta("ssl.mask_ratio=[0.25,0.5]", "ssl.mask_sample_probability=0.5")
    views, ids = make_batch(b=8)
    masks = meta._masks(torch.rand(8, 3, 64, 64), ids, torch.ones(8, 3, dtype=torch.bool))
    assert masks.shape == (24, 64)
    ratio = masks.float().mean(dim=1)
    assert (ratio > 0).sum() == 12  # half the samples carry a mask
    assert ratio.max() <= 0.5


# --- Sinkhorn-Knopp targets against a float64 reference -------------------------------------

def test_sinkhorn_terms_equal_a_float64_reference():
    meta, cfg = make_meta("ssl.centering=sinkhorn_knopp", "ssl.sinkhorn_iterations=3")
    rec = record(meta)
    views, ids = make_batch()
    out = meta(views, ids, epoch=5)
    temp, tau = cfg.ssl.teacher_temp, cfg.ssl.student_temp
    (_, t_dino), = rec.calls["teacher_dino_head"]
    (_, s_glob), (_, s_loc) = rec.calls["student_dino_head"]
    p = sinkhorn_reference(t_dino, temp, 3).chunk(2)
    logp = [F.log_softmax(x.double() / tau, dim=-1) for x in list(s_glob.chunk(2)) + list(s_loc.chunk(2))]
    pairs = [-(p[i] * logp[j]).sum(-1).mean() for i in range(2) for j in range(len(logp)) if i != j]
    torch.testing.assert_close(out["dino"].double(), torch.stack(pairs).mean(), atol=1e-5, rtol=1e-5)

    (_, t_patch), = rec.calls["teacher_ibot_head"]
    (_, s_patch), = rec.calls["student_ibot_head"]
    masks = torch.cat(rec.masks)
    ce = -(sinkhorn_reference(t_patch, temp, 3) * F.log_softmax(s_patch.double() / tau, dim=-1)).sum(-1)
    per_token_weight = (1.0 / masks.sum(dim=1, keepdim=True).double()).expand_as(masks)[masks]
    ref = (ce * per_token_weight).sum() / masks.shape[0]
    torch.testing.assert_close(out["ibot"].double(), ref, atol=1e-5, rtol=1e-5)
    # Sinkhorn-Knopp mode holds no centre (nothing to all-reduce and throw away).
    assert not hasattr(meta, "dino_loss") and not hasattr(meta, "ibot_loss")
    assert not any("center" in k for k in meta.state_dict())


# --- heads, switches, schedules, EMA ----------------------------------------------------------

@pytest.mark.parametrize("variant, blocks_per_depth", [("boc", 1), ("hierarchical", 2), ("channelvit", 1)])
def test_meta_architecture_has_dinov2_shape_and_names_every_block(variant, blocks_per_depth):
    meta, cfg = make_meta(f"model.variant={variant}")
    assert isinstance(meta.student, torch.nn.ModuleDict) and isinstance(meta.teacher, torch.nn.ModuleDict)
    assert list(meta.student) == list(meta.teacher) == ["backbone", "dino_head", "ibot_head"]
    assert meta.backbones() == (meta.student.backbone, meta.teacher.backbone)
    assert meta.heads() == [meta.student.dino_head, meta.student.ibot_head, meta.teacher.dino_head,
                            meta.teacher.ibot_head]
    depth = cfg.model.depth
    student_blocks = meta.transformer_blocks(teacher=False)
    assert student_blocks == meta.student.backbone.transformer_blocks()
    assert len(student_blocks) == blocks_per_depth * depth
    assert meta.transformer_blocks() == student_blocks + meta.teacher.backbone.transformer_blocks()
    if variant == "hierarchical":
        assert all(any(c is b for b in student_blocks) for c in meta.student.backbone.cross_blocks)
    names = {".".join(n.split(".")[:2]) for n, _ in meta.named_parameters()}
    parts = ("backbone", "dino_head", "ibot_head")
    assert names == {f"{net}.{part}" for net in ("student", "teacher") for part in parts}
    assert list(make_meta("ssl.ibot=false")[0].teacher) == ["backbone", "dino_head"]


def test_teacher_backbone_state_dict_is_what_an_encoder_loads():
    meta, cfg = make_meta("model.variant=hierarchical")
    with torch.no_grad():
        for p in meta.student.parameters():
            p.add_(0.1)
    meta.update_teacher(0.5)
    state = meta.teacher_backbone_state_dict()
    assert state.keys() == meta.teacher.backbone.state_dict().keys()
    for key, value in meta.teacher.backbone.state_dict().items():
        assert torch.equal(state[key], value), key
    fresh = build_model(cfg.model, CHANNELS, load_pretrained=False)
    fresh.load_state_dict(state)
    views, ids = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(fresh.embed(views[0], ids), meta.teacher.backbone.embed(views[0], ids))
        assert not torch.allclose(fresh.embed(views[0], ids), meta.student.backbone.embed(views[0], ids))


def test_heads_are_untied_and_the_teacher_heads_built_anew():
    meta, _ = make_meta()
    for name in ("dino_head", "ibot_head"):
        student, teacher = meta.student[name], meta.teacher[name]
        assert student is not teacher
        for (name, ps), pt in zip(student.state_dict().items(), teacher.state_dict().values()):
            assert torch.equal(ps, pt) and ps.data_ptr() != pt.data_ptr(), name
        assert not any(p.requires_grad for p in teacher.parameters())
    w_dino = meta.student.dino_head.last_layer.weight_v
    w_ibot = meta.student.ibot_head.last_layer.weight_v
    assert not torch.equal(w_dino, w_ibot)


@pytest.mark.parametrize(
    "switches, terms",
    [(["ssl.ibot=false"], {"dino", "koleo"}), (["ssl.dino=false"], {"ibot", "koleo"}),
     (["ssl.koleo=false", "ssl.ibot=false"], {"dino"}), ([], {"dino", "ibot", "koleo"})],
)
def test_each_term_can_be_switched_off(switches, terms):
    meta, _ = make_meta(*switches)
    views, ids = make_batch()
    out = meta(views, ids, epoch=0)
    assert set(out) == terms | {"loss"} | ({"dino_target_entropy"} if "dino" in terms else set())
    weights = {"dino": 1.0, "ibot": 1.0, "koleo": 0.1}
    torch.testing.assert_close(out["loss"].detach(), sum(weights[k] * out[k] for k in terms))
    out["loss"].backward()
    assert meta.student.backbone.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert ("ibot_head" in meta.student) == ("ibot_head" in meta.teacher) == ("ibot" in terms)
    assert ("dino_head" in meta.student) == ("dino" in terms)


def test_no_term_left_is_a_config_error():
    with pytest.raises(ConfigError, match="ssl.dino and ssl.ibot"):
        load_config(None, ["ssl.dino=false", "ssl.ibot=false"])
    with pytest.raises(ConfigError, match="ssl.centering"):
        load_config(None, ["ssl.centering=median"])


def test_teacher_temperature_warms_up_linearly_as_in_lightly():
    meta, _ = make_meta("ssl.warmup_teacher_temp=0.04", "ssl.teacher_temp=0.07", "ssl.warmup_teacher_temp_epochs=3")
    assert [meta.teacher_temperature(e) for e in range(5)] == pytest.approx([0.04, 0.055, 0.07, 0.07, 0.07])


def test_last_layers_are_frozen_in_the_first_epoch_only():
    meta, _ = make_meta("ssl.freeze_last_layer_epochs=1")
    views, ids = make_batch()
    for epoch, frozen in ((0, True), (1, False)):
        meta.zero_grad()
        meta(views, ids, epoch=epoch)["loss"].backward()
        meta.cancel_last_layer_gradients(epoch)
        for head in (meta.student.dino_head, meta.student.ibot_head):
            assert (head.last_layer.weight_v.grad is None) == frozen
            assert head.layers[0].weight.grad is not None


def test_update_teacher_is_an_ema_of_backbone_and_both_heads():
    meta, _ = make_meta()
    with torch.no_grad():
        for p in meta.student.parameters():
            p.add_(0.1)
    pairs = [(meta.student[name], meta.teacher[name]) for name in ("backbone", "dino_head", "ibot_head")]
    before = [({k: v.clone() for k, v in s.state_dict().items()}, {k: v.clone() for k, v in t.state_dict().items()})
              for s, t in pairs]
    meta.update_teacher(0.75)
    for (_, t), (s0, t0) in zip(pairs, before):
        for k, v in t.state_dict().items():
            if v.is_floating_point():
                torch.testing.assert_close(v, 0.75 * t0[k] + 0.25 * s0[k])


def test_teacher_runs_in_eval_mode_while_the_student_trains():
    meta, _ = make_meta("model.drop_path_rate=0.5")
    meta.train()
    assert meta.student.training and meta.student.backbone.training and meta.student.dino_head.training
    assert not any(m.training for m in meta.teacher.modules())
    views, ids = make_batch()
    with torch.no_grad():
        a = meta.teacher.backbone.forward_features(views[0], ids)["x_norm_clstoken"]
        b = meta.teacher.backbone.forward_features(views[0], ids)["x_norm_clstoken"]
    torch.testing.assert_close(a, b)  # no stochastic depth in the teacher


def test_hierarchical_channel_sampling_feeds_subsets_to_both_networks():
    meta, _ = make_meta("ssl.channel_sampling=hierarchical")
    seen = []
    for net in meta.backbones():
        forward = net.forward_features

        def spy(x, ids, mask=None, masks=None, forward=forward):
            seen.append(mask.clone())
            return forward(x, ids, mask, masks=masks)

        net.forward_features = spy
    views, ids = make_batch(b=16)
    torch.manual_seed(0)
    out = meta(views, ids, epoch=0)
    assert torch.isfinite(out["loss"])
    teacher_mask, student_mask = seen[0], seen[1]
    assert torch.equal(teacher_mask, student_mask)  # rows of teacher and student align
    assert teacher_mask.any(dim=1).all() and not teacher_mask.all()
    with pytest.raises(ConfigError, match="fixed"):
        load_config(None, ["ssl.channel_sampling=hierarchical", "model.variant=fixed"])


def test_channel_mask_drops_absent_channels_from_the_samples():
    meta, _ = make_meta()
    rec = record(meta)
    views, ids = make_batch(b=4)
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[0, 1] = mask[2, 2] = False
    meta(views, ids, epoch=0, channel_mask=mask)
    (_, t_dino), = rec.calls["teacher_dino_head"]
    assert t_dino.shape[0] == 2 * 10  # two global views x ten present channels


def test_cell_target_feeds_each_images_mean_channel_token_to_the_dino_heads():
    meta, _ = make_meta("ssl.cell_target=true")
    rec = record(meta)
    views, ids = make_batch(b=4, n_local=2)
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[0, 1] = False
    out = meta(views, ids, epoch=0, channel_mask=mask)
    (t_in, _), = rec.calls["teacher_dino_head"]
    assert t_in.shape[0] == 2 * 4  # one row per image and global view, not per channel
    with torch.no_grad():
        g = torch.cat(views[:2])
        cls = meta.teacher.backbone.forward_features(g, ids.repeat(2, 1), mask.repeat(2, 1))["x_norm_clstoken"]
    present = mask.repeat(2, 1)
    first = cls[: int(present[0].sum())].mean(0)  # image 0: its two present channels
    torch.testing.assert_close(t_in[0], first)
    student_rows = [x.shape[0] for x, _ in rec.calls["student_dino_head"]]
    assert student_rows == [2 * 4, 2 * 4]  # globals, then the locals, per image
    assert torch.isfinite(out["loss"])
    # the mean is differentiable: DINO and KoLeo reach the student's backbone through it
    rows = torch.randn(5, 3, requires_grad=True)
    mean_per_image(rows, torch.tensor([[True, True, False], [True, True, True]])).sum().backward()
    torch.testing.assert_close(rows.grad[:, 0], torch.tensor([1 / 2, 1 / 2, 1 / 3, 1 / 3, 1 / 3]))


@pytest.mark.parametrize("variant", ["fixed", "boc", "hierarchical", "channelvit"])
def test_full_objective_runs_on_every_model_variant(variant):
    sampling = "none" if variant == "fixed" else "hierarchical"
    meta, _ = make_meta(f"model.variant={variant}", f"ssl.channel_sampling={sampling}")
    views, ids = make_batch(b=3)
    out = meta(views, ids, epoch=0)
    assert set(out) == {"loss", "dino", "ibot", "koleo", "dino_target_entropy"}
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    grads = [p.grad for p in meta.student.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    meta.update_teacher(0.9)


def test_target_entropy_reads_one_for_uniform_targets_and_zero_for_one_hot():
    from cellvit_ssl.ssl import target_entropy

    assert float(target_entropy(torch.full((5, 16), 1 / 16))) == pytest.approx(1.0)
    assert float(target_entropy(torch.eye(16)[:5])) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "mean"])
def test_a_colder_teacher_gives_sharper_targets(centering):
    """The logged diagnostic follows the teacher temperature, with either centring."""
    entropies = []
    for temp in (0.2, 0.02):
        meta, _ = make_meta(f"ssl.centering={centering}", f"ssl.teacher_temp={temp}", f"ssl.warmup_teacher_temp={temp}")
        torch.manual_seed(0)
        views, ids = make_batch(b=4)
        entropies.append(float(meta(views, ids, epoch=0)["dino_target_entropy"]))
    assert 0.0 <= entropies[1] < entropies[0] <= 1.0
