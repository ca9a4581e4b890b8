"""Distillation: each loss against hand-computed numbers, the hidden-state capture, a student pulled towards its
teacher, end-to-end training with a teacher run, and the bad-input lines."""
import csv
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_args

from recsys.cli import main
from recsys.losses.distill import EmbeddingMSELoss, HiddenStateLoss, MarginMSELoss, ScoreKLLoss, uniform_layer_map
from recsys.models.teacher import capture_hidden


def _softmax(xs):
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


def test_score_kl_matches_hand_computation_and_ignores_masked_items():
    s = torch.tensor([[2.0, 0.0, 1.0], [0.5, 1.5, -1.0]])
    t = torch.tensor([[1.0, 1.0, 0.0], [0.0, 3.0, 2.0]])
    T = 2.0
    expected = 0.0
    for rs, rt in zip(s.tolist(), t.tolist(), strict=True):
        ps, pt = _softmax([x / T for x in rs]), _softmax([x / T for x in rt])
        expected += sum(q * math.log(q / p) for p, q in zip(ps, pt, strict=True))
    assert ScoreKLLoss(T)(s, t).item() == pytest.approx(expected / 2 * T * T, rel=1e-6)
    assert ScoreKLLoss(T)(t, t).item() == pytest.approx(0.0, abs=1e-7)
    # a masked (false-negative) item takes no part: changing its logits changes nothing; the positive always counts
    mask = torch.tensor([[True, False, True], [False, False, False]])
    a = ScoreKLLoss(T)(s, t, mask)
    s2, t2 = s.clone(), t.clone()
    s2[0, 2], t2[0, 2] = 9.0, -9.0
    assert ScoreKLLoss(T)(s2, t2, mask).item() == pytest.approx(a.item(), rel=1e-6)
    row1 = sum(q * math.log(q / p) for p, q in zip(_softmax([1.0, 0.0]), _softmax([0.5, 0.5]), strict=True))
    row2 = sum(q * math.log(q / p) for p, q in zip(_softmax([0.25, 0.75, -0.5]), _softmax([0.0, 1.5, 1.0]),
                                                     strict=True))
    assert a.item() == pytest.approx((row1 + row2) / 2 * T * T, rel=1e-6)


def test_margin_mse_matches_hand_computation():
    s = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 4.0]])
    t = torch.tensor([[2.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    # row 0: student margins 2, 3; teacher 1, 1 → errors 1, 4. row 1: student 1, -2; teacher 1, 0 → 0, 4
    assert MarginMSELoss()(s, t).item() == pytest.approx((1 + 4 + 0 + 4) / 4)
    mask = torch.tensor([[False, False, True], [True, False, False]])  # drops (0, 2) and (1, 0)
    assert MarginMSELoss()(s, t, mask).item() == pytest.approx((1 + 4) / 2)


def test_embedding_mse_is_exact_and_projects_other_dims():
    s, t = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert EmbeddingMSELoss(2, 2)(s, t).item() == pytest.approx((1 + (1 + 1)) / 2)
    proj = EmbeddingMSELoss(3, 2)
    assert isinstance(proj.proj, torch.nn.Linear) and proj.proj.weight.shape == (2, 3)
    with torch.no_grad():
        proj.proj.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
    s3 = torch.cat([s, torch.ones(2, 1)], 1)
    assert proj(s3, t).item() == pytest.approx(EmbeddingMSELoss(2, 2)(s, t).item())


def test_hidden_state_loss_skips_padding_and_follows_the_layer_map():
    assert uniform_layer_map(3, 6) == [2, 4, 6] and uniform_layer_map(2, 2) == [1, 2]
    B, L, H = 1, 3, 2
    teacher = [torch.zeros(B, L, H) for _ in range(5)]  # embeddings + 4 layers
    teacher[4] = torch.ones(B, L, H)
    student = [torch.zeros(B, L, H) for _ in range(3)]  # embeddings + 2 layers
    mask = torch.tensor([[1, 1, 0]])
    loss = HiddenStateLoss([2, 4], H, H)
    assert loss(student, teacher, mask).item() == pytest.approx(1.0)  # layer 2 ↔ 4: error 1 per element
    student[2][0, 2] = 100.0  # a padded position: ignored
    assert loss(student, teacher, mask).item() == pytest.approx(1.0)
    assert HiddenStateLoss([2, 0], H, H)(student, teacher, mask).item() == pytest.approx(0.0)  # 0 = no target


def test_capture_hidden_collects_every_layer(tiny_model):
    from recsys.models.encoder import BertEncoder
    enc = BertEncoder.from_pretrained(tiny_model).eval()
    ids = torch.randint(1000, 2000, (2, 7))
    with capture_hidden(enc) as states:
        out = enc(ids)
    assert len(states) == 1 + enc.shape.n_layers and all(s.shape == (2, 7, 32) for s in states)
    assert torch.equal(states[-1], out)
    enc(ids)
    assert len(states) == 1 + enc.shape.n_layers  # hooks removed on exit


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("distill")
    args = tiny_run_args(tiny_model, tmp)
    assert main(["train", *args, "tracking.run_name=teacher"]) == 0
    return tmp / "results" / "runs" / "teacher", args, tmp


def _student(tiny_model, teacher: Path, layers=None, projection_dim=8, **distill):
    """A student built as a run config describes it (the teacher loaded and attached by build_module)."""
    from recsys.config import DistillConfig, ModelConfig, RunConfig
    from recsys.runs import build_module
    return build_module(RunConfig(model=ModelConfig(encoder=tiny_model, projection_dim=projection_dim, layers=layers),
                                  distill=DistillConfig(teacher=str(teacher), **distill)))


def test_distillation_pulls_the_student_towards_the_teacher(teacher_run, tiny_model):
    """Trained on the KL term alone, a fresh student's in-batch score distributions approach the teacher's."""
    teacher, _, _ = teacher_run
    torch.manual_seed(0)
    student = _student(tiny_model, teacher, loss="kl", hidden_weight=0.5)
    assert student.user_tower.dim == 8 and student.distiller.teacher.user_tower.dim == 32  # dims may differ
    n_items = 40
    ids = torch.randint(1000, 5000, (n_items, 10))
    items = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    student.distiller.item_emb = student.distiller.teacher.item_tower(**items).detach()
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)

    def step(train: bool) -> float:
        pick = torch.arange(16) if not train else torch.randperm(n_items)[:16]
        batch = {"user": {k: v[pick] for k, v in items.items()}, "items": pick,
                 "false_negatives": torch.zeros(16, 16, dtype=torch.bool)}
        student.train(train)
        with capture_hidden(student.user_tower.encoder) as hidden:
            u = student.user_tower(**batch["user"])
        i = student.item_tower(**batch["user"])
        loss, terms = student.distiller(u, i, student.temperature, batch, hidden)
        if train:
            opt.zero_grad()
            loss.backward()
            opt.step()
        return terms["train/distill_loss"].item()

    before = step(False)
    for _ in range(60):
        step(True)
    assert step(False) < 0.5 * before
    assert not any(p.requires_grad for p in student.distiller.teacher.parameters())
    assert not any(k.startswith("distiller.teacher") for k in student.state_dict())  # the teacher is not saved


def test_training_with_a_teacher_logs_every_term_and_loads_back(teacher_run):
    teacher, args, tmp = teacher_run
    assert main(["train", *args, "tracking.run_name=student", f"distill.teacher={teacher}", "distill.alpha=2",
                 "distill.loss=margin_mse", "distill.hidden_weight=1.0", "distill.layer_map=[0,2]"]) == 0
    run = tmp / "results" / "runs" / "student"
    with open(run / "log" / "metrics.csv") as f:
        header = next(csv.reader(f))
    assert {"train/task_loss", "train/distill_loss", "train/hidden_loss"} <= set(header)
    from recsys.runs import load_run
    _, module = load_run(run)  # without its teacher
    assert module.distiller is None


def test_distillation_bad_input(teacher_run, tmp_path, capsys):
    teacher, args, tmp = teacher_run
    cases = {
        f"distill.teacher={tmp_path / 'nope'}": "is not a finished run",
        "distill.loss=cosine": "loss must be one of kl, margin_mse, embedding_mse",
        "distill.temperature=0": "temperature must be > 0",
        f"distill.teacher={teacher} distill.hidden_weight=1 distill.layer_map=[1]": "distill.layer_map: [1] needs 2",
    }
    for override, message in cases.items():
        assert main(["train", *args, "tracking.run_name=bad", *override.split()]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not (tmp / "results" / "runs" / "bad").exists()


def test_teacher_with_another_tokenizer_is_refused(teacher_run, tmp_path, capsys):
    from transformers import BertConfig, BertModel, BertTokenizerFast
    # a plausible vocabulary of its own (the loader refuses implausibly small ones), not the student's
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "movie", "gift", "card", "is", "of", "and",
             "to", "in", "for"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + [f"w{i}" for i in range(100)]
    other = tmp_path / "other"
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}).save_pretrained(other)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(other)
    teacher, args, tmp = teacher_run
    args = [a for a in args if not a.startswith("model.encoder")]
    assert main(["train", *args, f"model.encoder={other}", "tracking.run_name=bad", f"distill.teacher={teacher}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tokenizer differs from the student's" in err[0], err


def test_fewer_layer_student_is_cut_from_the_checkpoint_and_maps_to_its_layers(teacher_run, tiny_model):
    from recsys.models.encoder import BertEncoder
    teacher, _, _ = teacher_run
    student = _student(tiny_model, teacher, hidden_weight=1.0)
    assert student.distiller.hidden.layer_map == [1, 2]  # same depth: layer i ↔ layer i
    cut = _student(tiny_model, teacher, layers=[1], projection_dim=None, hidden_weight=1.0)
    assert cut.user_tower.encoder.shape.n_layers == 1 and len(cut.user_tower.encoder.layers) == 1
    assert cut.distiller.hidden.layer_map == [2]  # the student's only layer is the checkpoint's second
    full = BertEncoder.from_pretrained(tiny_model)
    assert torch.equal(cut.user_tower.encoder.layers[0].ffn.up.weight, full.layers[1].ffn.up.weight)


def test_fewer_layer_bad_input(small_synthetic_args, tmp_path, capsys):
    cases = {"model.layers=[5]": "model.layers: [5] — ", "model.layers=[1,0]": "layers must be"}
    for override, message in cases.items():
        assert main(["train", *small_synthetic_args, override]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
