"""Official RCAR checkpoints: a checkpoint made in the exact official layout (DataParallel
'module.' keys, argparse opt, epoch) loads into the right model, the encoders compute what the
public encoders compute, and malformed checkpoints are refused with a clear message."""
import argparse
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rcar_fast import reference
from rcar_fast.checkpoint import (CheckpointError, load_rcar_checkpoint, official_state_dict,
                                  save_rcar_checkpoint)
from rcar_fast.encoders import EncoderImage, EncoderText, RCARModel
from tests.tolerances import F32_RCAR_CHECKPOINT_VS_PUBLIC, assert_close

SIZES = dict(img_dim=12, embed_size=16, word_dim=8, sim_dim=8, vocab_size=30)


def official_opt(**overrides):
    opt = argparse.Namespace(
        data_name="f30k_precomp", vocab_path="./data/vocab", img_dim=SIZES["img_dim"],
        embed_size=SIZES["embed_size"], word_dim=SIZES["word_dim"], sim_dim=SIZES["sim_dim"],
        vocab_size=SIZES["vocab_size"], num_layers=1, use_bi_gru=True, no_imgnorm=False,
        no_txtnorm=False, attn_type="t2i", t2i_smooth=10.0, i2t_smooth=3.0,
        self_regulator="coop_rcar", rcar_step=2, rcr_step=0, rar_step=0, margin=0.2,
        max_violation=True)
    for key, value in overrides.items():
        setattr(opt, key, value)
    return opt


class OfficialLayoutModel(nn.Module):
    """The public SCANpp module tree (img_enc / txt_enc / sim_enc with the public submodule
    names), built here from plain torch modules, independent of rcar_fast.encoders."""

    def __init__(self, opt):
        super().__init__()
        self.img_enc = nn.Module()
        self.img_enc.fc = nn.Linear(opt.img_dim, opt.embed_size)
        self.img_enc.mlp = nn.Module()
        self.img_enc.mlp.layers = nn.ModuleList([nn.Linear(opt.img_dim, opt.embed_size // 2),
                                                 nn.Linear(opt.embed_size // 2, opt.embed_size)])
        self.img_enc.mlp.bns = nn.ModuleList([nn.BatchNorm1d(opt.embed_size // 2),
                                              nn.BatchNorm1d(opt.embed_size)])
        self.txt_enc = nn.Module()
        self.txt_enc.embed = nn.Embedding(opt.vocab_size, opt.word_dim)
        self.txt_enc.rnn = nn.GRU(opt.word_dim, opt.embed_size, opt.num_layers, batch_first=True,
                                  bidirectional=opt.use_bi_gru)
        steps = {"coop_rcar": opt.rcar_step, "only_rcr": opt.rcr_step, "only_rar": opt.rar_step}
        self.sim_enc = reference.RCARHead(opt.embed_size, opt.sim_dim, opt.self_regulator,
                                          steps[opt.self_regulator], opt.attn_type,
                                          getattr(opt, f"{opt.attn_type}_smooth"))
        with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode matters
            for bn in self.img_enc.mlp.bns:
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)

    # What the public encoders compute, written out step by step.
    def image_embeddings(self, feats):
        enc = self.img_enc
        hidden = F.relu(F.batch_norm(enc.mlp.layers[0](feats.reshape(-1, feats.shape[-1])),
                                     enc.mlp.bns[0].running_mean, enc.mlp.bns[0].running_var,
                                     enc.mlp.bns[0].weight, enc.mlp.bns[0].bias, False, 0.0,
                                     enc.mlp.bns[0].eps))
        x = enc.mlp.layers[1](hidden).reshape(*feats.shape[:-1], -1) + enc.fc(feats)
        return x / (x.norm(dim=-1, keepdim=True) + 1e-8)

    def caption_embedding(self, ids):
        out, _ = self.txt_enc.rnn(self.txt_enc.embed(ids)[None])
        half = out.shape[-1] // 2
        x = (out[0, :, :half] + out[0, :, half:]) / 2
        return x / (x.norm(dim=-1, keepdim=True) + 1e-8)


def make_official_checkpoint(path, opt=None, epoch=17, mutate=None, saved_opt=None):
    """Saves a checkpoint of a model built from ``opt``; ``saved_opt`` (default: opt) is
    what the file claims, to make inconsistent checkpoints."""
    opt = opt or official_opt()
    torch.manual_seed(1)
    model = OfficialLayoutModel(opt)
    state = nn.DataParallel(model).state_dict()     # the real 'module.' prefix
    if mutate:
        mutate(state)
    torch.save({"model": state, "opt": saved_opt or opt, "epoch": epoch, "best_rsum": 500.0},
               path)
    return model.eval()


def random_captions(n, vocab_size, generator):
    lengths = torch.randint(1, 9, (n,), generator=generator)
    return [torch.randint(0, vocab_size, (int(L),), generator=generator).tolist() for L in lengths]


def test_official_keys_are_those_of_the_public_code(tmp_path):
    path = tmp_path / "model_best.pth"
    make_official_checkpoint(path)
    keys = set(torch.load(path, weights_only=False)["model"])
    model = load_rcar_checkpoint(path)
    assert set(official_state_dict(model)) == keys
    for key in ("module.img_enc.fc.weight", "module.img_enc.mlp.layers.1.bias",
                "module.img_enc.mlp.bns.0.running_var", "module.img_enc.mlp.bns.1.weight",
                "module.txt_enc.embed.weight", "module.txt_enc.rnn.weight_hh_l0_reverse",
                "module.sim_enc.sim_eval_w.weight",
                "module.sim_enc.rar_modules.0.rar_q_w.0.weight",
                "module.sim_enc.rcr_modules.0.rcr_matrix_w.2.bias",
                "module.sim_enc.alv_modules.1.sim_transform_w.weight"):
        assert key in keys


def test_loaded_model_matches_the_public_computation(tmp_path):
    path = tmp_path / "model_best.pth"
    official = make_official_checkpoint(path)
    model = load_rcar_checkpoint(path)
    assert not model.training and model.epoch == 17 and model.opt["attn_type"] == "t2i"
    assert model.sim_enc.regulator == "coop_rcar" and model.sim_enc.steps == 2
    assert model.sim_enc.smooth == 10.0

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(4, 5, SIZES["img_dim"], generator=g)
    captions = random_captions(9, SIZES["vocab_size"], g)
    with torch.no_grad():
        img = model.encode_images(feats, batch_size=3)
        assert_close(img, official.image_embeddings(feats), F32_RCAR_CHECKPOINT_VS_PUBLIC)
        cap, lens = model.encode_captions(captions, batch_size=4)
        assert lens.tolist() == [len(c) for c in captions]
        for j, ids in enumerate(captions):
            assert_close(cap[j, :len(ids)], official.caption_embedding(torch.tensor(ids)),
                         F32_RCAR_CHECKPOINT_VS_PUBLIC)
            assert not cap[j, len(ids):].any()        # padding is zeros
        # The head: the loaded one against the reference head holding the official weights.
        expected = official.sim_enc.forward_vectorized(img, cap, lens)
        got = model.sim_enc.forward_vectorized(img, cap, lens)
        assert_close(got, expected, F32_RCAR_CHECKPOINT_VS_PUBLIC)
        loop = reference.RCARHead(16, 8, "coop_rcar", 2).eval()   # eval: no RAR dropout
        loop.load_official_state_dict(torch.load(path, weights_only=False))
        assert_close(loop.forward_loop(img, cap, lens), got, F32_RCAR_CHECKPOINT_VS_PUBLIC)


def test_save_load_round_trip(tmp_path):
    path = tmp_path / "model_best.pth"
    make_official_checkpoint(path, official_opt(self_regulator="only_rcr", rcr_step=1,
                                                attn_type="i2t", i2t_smooth=4.0))
    model = load_rcar_checkpoint(path)
    assert (model.sim_enc.regulator, model.sim_enc.steps) == ("only_rcr", 1)
    assert (model.sim_enc.direction, model.sim_enc.smooth) == ("i2t", 4.0)
    again_path = tmp_path / "again.pth"
    save_rcar_checkpoint(model, again_path, epoch=3)
    again = load_rcar_checkpoint(again_path)
    assert again.epoch == 3
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    # Written atomically: no temporary file is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.pth", "model_best.pth"]


def test_encoders_with_our_classes_match_the_official_layout(tmp_path):
    # RCARModel built from rcar_fast.encoders saves to exactly the official key set.
    img_enc = EncoderImage(12, 16)
    txt_enc = EncoderText(30, 16, 8, 1, True)
    sim_enc = reference.RCARHead(16, 8, "coop_rcar", 2)
    ours = RCARModel(img_enc, txt_enc, sim_enc, opt=vars(official_opt()), epoch=0)
    path = tmp_path / "ours.pth"
    save_rcar_checkpoint(ours, path)
    official_path = tmp_path / "official.pth"
    make_official_checkpoint(official_path)
    assert (set(torch.load(path, weights_only=False)["model"])
            == set(torch.load(official_path, weights_only=False)["model"]))


def drop(prefix):
    def mutate(state):
        for key in [k for k in state if k.startswith(prefix)]:
            del state[key]
    return mutate


@pytest.mark.parametrize("content,match", [
    ([1, 2, 3], "must be a dict with 'model', 'opt', 'epoch'"),
    ({"opt": official_opt(), "epoch": 1}, "no 'model' state dict"),
    ({"model": {"module.img_enc.fc.weight": torch.zeros(16, 12)}, "epoch": 1}, "no 'opt' entry"),
])
def test_malformed_containers_are_refused(tmp_path, content, match):
    path = tmp_path / "bad.pth"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=match):
        load_rcar_checkpoint(path)


@pytest.mark.parametrize("saved_opt,mutate,match", [
    (None, drop("module.sim_enc."), r"missing parts: \['sim_enc'\]"),
    (None, drop("module.sim_enc.rar_modules.1."),
     r"(?s)sim_enc weights do not fit.*'rar': 2.*'rar': 1.*missing keys"),
    (official_opt(rcar_step=3), None,
     r"(?s)coop_rcar with 3 steps needs.*'alv': 3.*'alv': 2.*missing keys"),
    (official_opt(embed_size=32), None, r"opt.embed_size = 32 but the weights say 16"),
    (official_opt(self_regulator="both"), None, r"opt.self_regulator must be one of"),
    (official_opt(attn_type="x2y"), None, r"opt.attn_type must be 't2i' or 'i2t'"),
    (None, lambda s: s.update({"module.extra.weight": torch.zeros(1)}), "unrecognised keys"),
])
def test_inconsistent_checkpoints_are_refused(tmp_path, saved_opt, mutate, match):
    path = tmp_path / "bad.pth"
    make_official_checkpoint(path, mutate=mutate, saved_opt=saved_opt)
    with pytest.raises(CheckpointError, match=match):
        load_rcar_checkpoint(path)


class _Arbitrary:
    pass


def test_untrusted_pickles_are_refused_unless_trusted(tmp_path):
    path = tmp_path / "model_best.pth"
    make_official_checkpoint(path)
    raw = torch.load(path, weights_only=False)
    raw["extra"] = _Arbitrary()
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match="trusted=True"):
        load_rcar_checkpoint(path)
    assert load_rcar_checkpoint(path, trusted=True).epoch == 17


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_rcar_checkpoint(tmp_path / "nope.pth")


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_checkpoint_is_reported_as_truncated_not_untrusted(tmp_path, legacy):
    path = tmp_path / "model_best.pth"
    make_official_checkpoint(tmp_path / "full.pth")
    raw = torch.load(tmp_path / "full.pth", weights_only=False)
    torch.save(raw, path, _use_new_zipfile_serialization=not legacy)
    content = path.read_bytes()
    path.write_bytes(content[:len(content) // 2])
    with pytest.raises(CheckpointError, match="truncated or not a torch checkpoint") as info:
        load_rcar_checkpoint(path)
    assert "trust" not in str(info.value)


def test_save_leaves_no_partial_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "full.pth"
    make_official_checkpoint(path)
    model = load_rcar_checkpoint(path)

    def failing_save(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_rcar_checkpoint(model, tmp_path / "copy.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.pth"]
