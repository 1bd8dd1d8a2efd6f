"""Official SCAN checkpoints (kuanghuei/SCAN train.py save_checkpoint): model = [img_enc state,
txt_enc state], opt with cross_attn, raw_feature_norm, agg_func, lambda_lse, lambda_softmax,
bi_gru, precomp_enc_type, no_imgnorm; they load into the SCAN encoders and head, and
`rcar-fast eval` scores them (t2i, i2t and their average ensemble)."""
import argparse
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rcar_fast import cli, data, metrics, reference
from rcar_fast.checkpoint import CheckpointError, load_checkpoint, load_scan_checkpoint
from tests.test_cli import make_vocab, needs_nltk, save_split
from tests.tolerances import (F32_LEGACY_ENCODERS_VS_PUBLIC, F32_SAME_MATH, F32_SCAN_ENCODERS_VS_PUBLIC,
                              F64_CHECKPOINT_SCORES, assert_close)

SIZES = dict(img_dim=12, embed_size=16, word_dim=8, vocab_size=30)


def scan_opt(**overrides):
    opt = argparse.Namespace(
        data_path="./data/", data_name="f30k_precomp", vocab_path="./vocab/", margin=0.2,
        num_epochs=30, batch_size=128, word_dim=SIZES["word_dim"], embed_size=SIZES["embed_size"],
        grad_clip=2.0, num_layers=1, learning_rate=0.0002, lr_update=15, workers=10,
        log_step=10, val_step=500, logger_name="./runs/runX/log",
        model_name="./runs/runX/checkpoint", resume="", max_violation=True,
        img_dim=SIZES["img_dim"], no_imgnorm=False, no_txtnorm=False,
        raw_feature_norm="clipped_l2norm", agg_func="LogSumExp", cross_attn="t2i",
        precomp_enc_type="basic", bi_gru=True, lambda_lse=6.0, lambda_softmax=9.0,
        vocab_size=SIZES["vocab_size"])
    for key, value in overrides.items():
        setattr(opt, key, value)
    return opt


class PublicLayout:
    """The public SCAN encoders' module trees (EncoderImagePrecomp / its weight_norm variant,
    EncoderText), built here from plain torch modules, and their forward passes."""

    def __init__(self, opt, seed=0):
        torch.manual_seed(seed)
        self.opt = opt
        self.fc = nn.Linear(opt.img_dim, opt.embed_size)
        if opt.precomp_enc_type == "weight_norm":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                self.fc = nn.utils.weight_norm(self.fc, dim=None)
        self.embed = nn.Embedding(opt.vocab_size, opt.word_dim)
        self.rnn = nn.GRU(opt.word_dim, opt.embed_size, opt.num_layers, batch_first=True,
                          bidirectional=opt.bi_gru)

    def state(self):
        img = nn.Module()
        img.fc = self.fc
        txt = nn.Module()
        txt.embed, txt.rnn = self.embed, self.rnn
        return [img.state_dict(), txt.state_dict()]

    @staticmethod
    def l2norm(x):
        return x / (x.pow(2).sum(-1, keepdim=True).sqrt() + 1e-8)

    @torch.no_grad()
    def images(self, features):
        out = self.fc(torch.as_tensor(np.array(features)))
        return out if self.opt.no_imgnorm else self.l2norm(out)

    @torch.no_grad()
    def captions(self, ids_list):
        lens = torch.tensor([len(t) for t in ids_list])
        ids = torch.zeros(len(ids_list), int(lens.max()), dtype=torch.long)
        for j, t in enumerate(ids_list):
            ids[j, :len(t)] = torch.tensor(t)
        packed = pack_padded_sequence(self.embed(ids), lens, batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True)
        if self.opt.bi_gru:
            half = out.shape[2] // 2
            out = (out[:, :, :half] + out[:, :, half:]) / 2
        return self.l2norm(out), lens

    def head_options(self):
        agg = {"LogSumExp": "lse", "Mean": "mean", "Max": "max", "Sum": "sum"}[self.opt.agg_func]
        return dict(direction=self.opt.cross_attn, raw_norm=self.opt.raw_feature_norm,
                    smooth=self.opt.lambda_softmax, agg=agg, lse_lambda=self.opt.lambda_lse)


def save_scan_checkpoint(path, opt, seed=0):
    public = PublicLayout(opt, seed)
    torch.save({"epoch": 7, "model": public.state(), "best_rsum": 300.0, "opt": opt,
                "Eiters": 1234}, path)
    return public


@pytest.mark.parametrize("overrides", [
    {},
    dict(precomp_enc_type="weight_norm", cross_attn="i2t", agg_func="Mean", bi_gru=False,
         raw_feature_norm="softmax", lambda_softmax=4.0),
    dict(agg_func="Max", raw_feature_norm="l2norm", no_imgnorm=True, num_layers=2),
])
def test_scan_checkpoint_loads_and_computes_what_the_public_model_does(tmp_path, overrides):
    opt = scan_opt(**overrides)
    path = tmp_path / "model_best.pth.tar"
    public = save_scan_checkpoint(path, opt)
    model = load_checkpoint(path)
    assert model.kind == "scan" and model.epoch == 7
    assert model.sim_enc.options() == public.head_options()
    feats = np.random.default_rng(0).standard_normal((3, 4, opt.img_dim)).astype(np.float32)
    ids = [[1, 5, 7, 2], [1, 9, 2], [1, 3, 4, 6, 8, 2]] * 5
    assert_close(model.encode_images(feats).numpy(), public.images(feats).numpy(), F32_SCAN_ENCODERS_VS_PUBLIC,
                 check_dtype=False)
    cap, lens = model.encode_captions(ids)
    want_cap, want_lens = public.captions(ids)
    assert torch.equal(lens, want_lens)
    assert_close(cap[:, :want_cap.shape[1]].numpy(), want_cap.numpy(), F32_SCAN_ENCODERS_VS_PUBLIC,
                 check_dtype=False)
    img = model.encode_images(feats)
    got = model.sim_enc(img.double(), cap.double(), lens, backend="reference")
    want = reference.scan_similarity_loop(public.images(feats).double(), want_cap.double(),
                                          want_lens, **public.head_options())
    assert_close(got.numpy(), want.numpy(), F64_CHECKPOINT_SCORES, check_dtype=False)


@pytest.mark.parametrize("overrides,match", [
    (dict(agg_func="Median"), "opt.agg_func must be one of"),
    (dict(raw_feature_norm="l3norm"), "opt.raw_feature_norm must be one of"),
    (dict(cross_attn="both"), "opt.cross_attn must be 't2i' or 'i2t'"),
    (dict(lambda_softmax=-1.0), "opt.lambda_softmax must be a positive finite number"),
    (dict(precomp_enc_type="fancy"), "opt.precomp_enc_type must be"),
])
def test_bad_scan_options_are_refused(tmp_path, overrides, match):
    path = tmp_path / "model_best.pth.tar"
    save_scan_checkpoint(path, scan_opt(**{k: v for k, v in overrides.items()
                                           if k != "precomp_enc_type"}))
    raw = torch.load(path, weights_only=False)
    for key, value in overrides.items():
        setattr(raw["opt"], key, value)
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match=match):
        load_scan_checkpoint(path)


def test_scan_weights_that_contradict_the_options_are_refused(tmp_path):
    path = tmp_path / "model_best.pth.tar"
    save_scan_checkpoint(path, scan_opt())
    raw = torch.load(path, weights_only=False)
    raw["opt"].embed_size = 32
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match="opt.embed_size = 32 but the weights say 16"):
        load_checkpoint(path)
    raw["model"] = raw["model"][:1]
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match=r"\[img_enc state dict, txt_enc state dict\]"):
        load_checkpoint(path)


@needs_nltk
def test_eval_scan_checkpoints_with_their_average_ensemble(tmp_path, capsys):
    split_dir, vocab_path = tmp_path / "f30k", tmp_path / "vocab.json"
    save_split(split_dir, n_img=6, seed=3)
    lines = (split_dir / "testall_caps.txt").read_text().splitlines()
    lines[0] = "\u00c9MILE runs a dog"        # SCAN lower-cases ASCII only
    (split_dir / "testall_caps.txt").write_text("\n".join(lines) + "\n")
    make_vocab(vocab_path)
    content = json.loads(vocab_path.read_text())
    content["word2idx"]["\u00e9mile"] = content["word2idx"].pop("w0")   # RCAR's lower-casing
    vocab_path.write_text(json.dumps(content))
    t2i, i2t = tmp_path / "scan_t2i.pth.tar", tmp_path / "scan_i2t.pth.tar"
    publics = [save_scan_checkpoint(t2i, scan_opt(), seed=1),
               save_scan_checkpoint(i2t, scan_opt(cross_attn="i2t", lambda_softmax=4.0,
                                                  agg_func="Mean"), seed=2)]
    out, saved = tmp_path / "r.json", tmp_path / "sims.npy"
    rc = cli.main(["eval", "--checkpoint", str(t2i), "--ensemble", str(i2t), "--data",
                   str(split_dir), "--vocab", str(vocab_path), "--json", str(out),
                   "--save", str(saved),
                   "--no-progress", "--backend", "reference"])
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "SCAN t2i (scan_t2i.pth.tar)" in printed and "SCAN i2t (scan_i2t.pth.tar)" in printed
    assert "Average i2t Recall:" in printed and "Text to image:" in printed
    result = json.loads(out.read_text())
    vocab = data.load_vocab(vocab_path)
    split = data.load_precomp(split_dir, "testall")
    ascii_lower = data.Tokenizer(lowercase="ascii")
    assert ascii_lower(split.captions[0])[0] == "\u00c9mile"
    ids = [vocab.encode(c, ascii_lower) for c in split.captions]
    assert ids[0][1] == vocab("<unk>") and vocab.encode(split.captions[0])[1] == vocab("\u00e9mile")
    sims = []
    for public in publics:
        cap, lens = public.captions(ids)
        sims.append(reference.scan_similarity_loop(public.images(split.images), cap, lens,
                                                   **public.head_options()))
    rows = list(result["metrics"].values())
    assert rows[0] == pytest.approx(metrics.recall_metrics(sims[0]))
    assert rows[1] == pytest.approx(metrics.recall_metrics(sims[1]))
    assert result["metrics"]["ensemble (ALL)"] == pytest.approx(
        metrics.recall_metrics(metrics.ensemble(*sims)))
    assert_close(np.load(saved), metrics.ensemble(*sims).numpy(), F32_SAME_MATH, check_dtype=False)


def test_legacy_serialisation_loads_weights_only(tmp_path):
    # 2018 SCAN checkpoints predate torch's zip format.
    path = tmp_path / "model_best.pth.tar"
    public = PublicLayout(scan_opt(), seed=3)
    torch.save({"epoch": 1, "model": public.state(), "best_rsum": 1.0, "opt": scan_opt(),
                "Eiters": 5}, path, _use_new_zipfile_serialization=False)
    model = load_checkpoint(path)
    assert model.kind == "scan" and model.sim_enc.agg == "lse"
    feats = np.ones((1, 2, SIZES["img_dim"]), np.float32)
    assert_close(model.encode_images(feats).numpy(), public.images(feats).numpy(),
                 F32_LEGACY_ENCODERS_VS_PUBLIC, check_dtype=False)
