"""The optimizer core's contract as users meet it: the defects found when lspo was tried as a drop-in
(each test failed before the core moved to C++), and the calls the Python face makes into it."""
import copy
import warnings

import pytest
import torch

import lspo


class Net(torch.nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(11, 24)
        self.a = torch.nn.Linear(24, 40)
        self.b = torch.nn.Linear(40, 33)
        self.head = torch.nn.Linear(33, 5)

    def forward(self, t):
        return self.head(torch.nn.functional.gelu(self.b(torch.tanh(self.a(self.emb(t))))))


def _batch(i, n=12):
    g = torch.Generator().manual_seed(700 + i)
    return torch.randint(0, 11, (n,), generator=g), torch.randint(0, 5, (n,), generator=g)


def _loss(m, i, n=12):
    t, y = _batch(i, n)
    return torch.nn.functional.cross_entropy(m(t), y)


def _lsp(m, **kw):
    args = dict(lr=1e-2, subspace=16, nnz=4, min_dim=16, refit_every=0)
    args.update(kw)
    return lspo.LSPAdamW(m, **args)


# ---------------------------------------------------------------- defect 1: weights changed after construction
@pytest.mark.parametrize("kind", ["offload", "lsp"])
def test_weights_loaded_after_construction_are_kept(kind):
    m, ref = Net(0), Net(0)
    opt = lspo.OffloadAdamW(m.parameters(), lr=1e-2) if kind == "offload" else _lsp(m, weight_decay=0.01)
    topt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    pretrained = Net(5).state_dict()
    m.load_state_dict(pretrained)      # after the optimizer was built
    ref.load_state_dict(pretrained)
    for i in range(2 if kind == "offload" else 1):  # LSP: after step 1 the projected layers differ from AdamW's
        for mm, oo in ((m, opt), (ref, topt)):
            _loss(mm, i).backward()
            oo.step()
            oo.zero_grad()
    # the dense parameters (all of them for Offload; embedding, biases, head for LSP) follow torch's
    # AdamW from the *loaded* weights (before the fix they were reverted to the init by the stale master)
    names = dict(m.named_parameters())
    proj = {id(p) for p in getattr(opt, "projected_params", [])}
    for n, p in ref.named_parameters():
        if id(names[n]) in proj:
            continue
        torch.testing.assert_close(names[n], p, rtol=1e-5, atol=1e-6, msg=n)


def test_bf16_parameter_reload_of_same_weights_keeps_the_fp32_master():
    torch.manual_seed(0)
    m = torch.nn.Linear(8, 4).to(torch.bfloat16)
    opt = lspo.OffloadAdamW(m.parameters(), lr=1e-3)
    m(torch.randn(3, 8, dtype=torch.bfloat16)).sum().backward()
    opt.step()
    opt.zero_grad()
    master = opt.state[m.weight]["master_param"].clone()
    assert not torch.equal(master, master.to(torch.bfloat16).float())  # the master holds more than bf16
    m.load_state_dict(m.state_dict())  # the same values, a new version counter
    m(torch.randn(3, 8, dtype=torch.bfloat16)).sum().backward()
    assert torch.equal(opt.state[m.weight]["master_param"], master)  # kept, not replaced by its rounding
    with torch.no_grad():
        m.weight.add_(1.0)  # really new weights: adopted
    m(torch.randn(3, 8, dtype=torch.bfloat16)).sum().backward()
    opt.step()
    torch.testing.assert_close(opt.state[m.weight]["master_param"], master + 1.0, atol=0.05, rtol=0)


# ---------------------------------------------------------------- defect 4: frozen parameters cost nothing
@pytest.mark.parametrize("kind", ["offload", "lsp"])
def test_frozen_parameters_allocate_nothing(kind):
    m = Net()
    for p in (m.emb.weight, m.a.weight, m.a.bias):
        p.requires_grad_(False)
    opt = lspo.OffloadAdamW(m.parameters(), lr=1e-2) if kind == "offload" else _lsp(m)
    assert opt.engine_stats()["slots_allocated"] == 0
    _loss(m, 0).backward()
    opt.step()
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert opt.engine_stats()["slots_allocated"] == len(trainable)
    assert m.emb.weight not in opt.state and m.a.weight not in opt.state
    assert all(p in opt.state for p in trainable)
    sd = opt.state_dict()
    assert len(sd["state"]) == len(trainable)
    frozen_bytes = sum(p.numel() for p in (m.emb.weight, m.a.weight, m.a.bias)) * 4
    st = opt.engine_stats()
    assert st["pinned_bytes"] + st["pageable_bytes"] < 8 * sum(p.numel() for p in trainable) * 4 + frozen_bytes


# ---------------------------------------------------------------- defect 5: options in param groups
@pytest.mark.parametrize("cls", [lspo.OffloadAdamW, lspo.LSPAdamW])
@pytest.mark.parametrize("bad", [dict(amsgrad=True), dict(maximize=True), dict(capturable=True), dict(fused=True)])
def test_unsupported_group_options_raise(cls, bad):
    m = Net()
    with pytest.raises(ValueError, match=list(bad)[0]):
        cls([{"params": list(m.parameters()), **bad}], lr=1e-3)
    opt = cls([{"params": [m.head.weight]}], lr=1e-3)
    with pytest.raises(ValueError, match=list(bad)[0]):
        opt.add_param_group({"params": [m.head.bias], **bad})


@pytest.mark.parametrize("cls", [lspo.OffloadAdamW, lspo.LSPAdamW])
def test_harmless_group_options_are_accepted(cls):
    m = Net()
    ok = dict(fused=False, foreach=None, maximize=False, capturable=False, differentiable=False, amsgrad=False)
    opt = cls([{"params": list(m.parameters()), **ok}], lr=1e-3)
    _loss(m, 0).backward()
    opt.step()
    assert not opt.last_step_skipped


def test_option_edited_in_a_group_later_is_checked_at_step():
    m = Net()
    opt = lspo.OffloadAdamW(m.parameters(), lr=1e-3)
    opt.param_groups[0]["amsgrad"] = True
    _loss(m, 0).backward()
    with pytest.raises(ValueError, match="amsgrad"):
        opt.step()


# ---------------------------------------------------------------- defect 6: deepcopy
@pytest.mark.parametrize("cls", [lspo.OffloadAdamW, lspo.LSPAdamW])
def test_deepcopy_is_refused_clearly(cls):
    opt = cls(Net().parameters(), lr=1e-3)
    with pytest.raises(TypeError, match="cannot be deep-copied.*state_dict"):
        copy.deepcopy(opt)


# ---------------------------------------------------------------- defect 7: CPUAdamW from torch's AdamW checkpoint
@pytest.mark.parametrize("torch_cls,wd", [(torch.optim.AdamW, 0.1), (torch.optim.Adam, 0.1)])
def test_cpu_adamw_continues_a_torch_checkpoint(torch_cls, wd):
    a, b = Net(1), Net(1)
    ta = torch_cls(a.parameters(), lr=1e-2, weight_decay=wd)
    for i in range(3):
        _loss(a, i).backward()
        ta.step()
        ta.zero_grad()
    b.load_state_dict(a.state_dict())
    cb = lspo.CPUAdamW(b.parameters(), lr=1e-2, weight_decay=wd)
    cb.load_state_dict(ta.state_dict())
    assert cb.param_groups[0]["adamw_mode"] is (torch_cls is torch.optim.AdamW)
    for i in range(3, 6):
        for m, o in ((a, ta), (b, cb)):
            _loss(m, i).backward()
            o.step()
            o.zero_grad()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=n)


def test_cpu_adamw_refuses_an_amsgrad_checkpoint():
    m = Net()
    t = torch.optim.AdamW(m.parameters(), amsgrad=True)
    _loss(m, 0).backward()
    t.step()
    with pytest.raises(ValueError, match="amsgrad"):
        lspo.CPUAdamW(m.parameters()).load_state_dict(t.state_dict())


# ---------------------------------------------------------------- defect 8: accumulation with refits
def test_accumulation_equals_one_big_batch_with_refits():
    # A refit check fits on the even micro-batches' sum and judges on the odd ones' (lspo/refit.h), so
    # 4 micro-batches (a, b, c, d) and 2 micro-batches (a+c, b+d) give the check the same two sums and
    # the step the same whole gradient: equal up to fp32 summation order, refits included.
    m1, m2, m4 = Net(3), Net(3), Net(3)
    kw = dict(refit_every=3, refit_threshold=0.0, refit_iters=5)
    o1, o2, o4 = _lsp(m1, **kw), _lsp(m2, **kw), _lsp(m4, **kw)
    ce = torch.nn.functional.cross_entropy
    for step in range(10):
        _loss(m1, step, n=48).backward()  # one batch of 48: an in-sample check
        t, y = _batch(step, 48)
        parts = [slice(12 * k, 12 * k + 12) for k in range(4)]
        for sl in parts:                   # the same 48 as 4 micro-batches of 12
            (ce(m4(t[sl]), y[sl]) / 4).backward()
        for a, b in ((0, 2), (1, 3)):      # ... and as 2 micro-batches of 24: (a + c), (b + d)
            ix = torch.cat([torch.arange(48)[parts[a]], torch.arange(48)[parts[b]]])
            (ce(m2(t[ix]), y[ix]) / 2).backward()
        for o in (o1, o2, o4):
            o.step()
            o.zero_grad()
    steps = [1, 1, 4, 4, 7, 7, 10, 10]
    assert [r["step"] for r in o1.refits] == [r["step"] for r in o2.refits] == [r["step"] for r in o4.refits] == steps
    assert any(r["kept"] for r in o4.refits)
    diff = max((p - q).abs().max().item() for p, q in zip(m2.parameters(), m4.parameters()))
    assert diff < 1e-4, diff  # fp32 summation order only
    # one micro-batch: the check is in-sample (fit = held-out), a different but valid refit target
    assert all(r["fit_before"] == 0 or r["heldout_before"] >= 0 for r in o1.refits)


def test_wrap_path_is_dense_on_refit_steps_and_compressed_otherwise():
    m = Net()
    opt = _lsp(m, refit_every=2, refit_threshold=0.0, refit_iters=3)
    assert opt.wrap(m) == 2
    seen = []
    for step in range(4):
        _loss(m, step).backward()
        # refit steps 1, 3: the dense gradient went into the check's sums (no S yet); else S arrived
        seen.append(opt._core.accumulated(opt._index[m.a.weight]) is None)
        assert m.a.weight.grad is None  # freed by the core either way
        opt.step()
        opt.zero_grad()
    assert seen == [True, False, True, False]
    assert [r["step"] for r in opt.refits] == [1, 1, 3, 3]


# ---------------------------------------------------------------- defect 9: clipping behind the optimizer's back
def test_clip_grad_norm_behind_lsp_warns_once():
    m = Net()
    opt = _lsp(m)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for i in range(3):
            _loss(m, i).backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)  # what HF Trainer does by default
            opt.step()
            opt.zero_grad()
    msgs = [str(x.message) for x in w if "max_grad_norm" in str(x.message)]
    assert len(msgs) == 1 and "invisible" in msgs[0]


def test_max_grad_norm_sees_projected_layers():
    m = Net()
    opt = _lsp(m, max_grad_norm=1e9)
    _loss(m, 0).backward()
    dense = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in m.parameters() if p.grad is not None]))
    opt.step()
    assert opt.last_grad_norm > dense.item()  # includes the compressed gradients of a.weight and b.weight


# ---------------------------------------------------------------- defect 10: param groups (HF Trainer's path)
def test_param_groups_get_the_module_rule():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(64, 32)
            self.up = torch.nn.Linear(32, 48)
            self.down = torch.nn.Linear(48, 32)
            self.lm_head = torch.nn.Linear(32, 64, bias=False)

    m = Tiny()
    decay = [p for n, p in m.named_parameters() if "bias" not in n]
    no_decay = [p for n, p in m.named_parameters() if "bias" in n]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    by_groups = lspo.LSPAdamW(groups, lr=1e-3, subspace=16, nnz=4)
    by_module = lspo.LSPAdamW(m, lr=1e-3, subspace=16, nnz=4)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(by_groups.projected_params) == ids(by_module.projected_params) == {id(m.up.weight), id(m.down.weight)}


def test_hf_trainer_with_optimizer_cls_projects_like_the_module_rule(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    data = [{"input_ids": torch.randint(0, 96, (16,)), "labels": torch.randint(0, 96, (16,))} for _ in range(8)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2,
                                          report_to=[], use_cpu=True, logging_steps=1, save_strategy="no")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   optimizer_cls_and_kwargs=(lspo.LSPAdamW, {"lr": 1e-3, "subspace": 16, "nnz": 4}))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        trainer.train()
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    proj = {id(p) for p in opt.projected_params}
    assert id(model.model.embed_tokens.weight) not in proj and id(model.lm_head.weight) not in proj
    assert id(model.model.layers[0].mlp.up_proj.weight) in proj
    # Trainer clips with clip_grad_norm_ by default (max_grad_norm=1.0): lspo says so, once
    assert sum("max_grad_norm" in str(x.message) for x in w) == 1


# ---------------------------------------------------------------- the thin Python face
@pytest.mark.parametrize("wrap", [False, True])
def test_at_most_two_core_calls_per_projected_layer_per_step(wrap):
    m = Net()
    opt = _lsp(m, refit_every=0)
    if wrap:
        opt.wrap(m)
    for i in range(2):  # warm up (the first step allocates)
        _loss(m, i).backward()
        opt.step()
        opt.zero_grad()
    steps = 3
    with lspo.diag.CoreCallCounter(opt) as c:
        for i in range(steps):
            _loss(m, 20 + i).backward()
            opt.step()
            opt.zero_grad()
    slots = c.projected_slots()
    assert len(slots) == 2
    assert all(c.per_slot.get(i, 0) >= steps for i in slots), c.per_slot  # every gradient reached the core
    assert c.per_layer_step(steps) <= 2, c.per_slot
    assert c.other / steps <= 4, c.other  # optimizer-wide: set_groups (step, zero_grad), step, zero_grad
