"""Build tiny, random-weight models for a local vLLM server, with no downloads.

Usage: python vllm_tiny_models.py OUT_DIR

(The project's own copy of ../shared/vllm/vllm_tiny_models.py; used by
tests/integration/vllm_server.sh. Keep GENERATOR_VERSION in step with changes.)

Creates, under OUT_DIR:
  tiny-llama/   LlamaForCausalLM (2 layers, hidden 256, 4 heads of 64), byte-level
                BPE tokenizer (4096 pieces) trained on this Python's own stdlib
                sources, Llama-3-style chat template.
  tiny-bert-embed/   BertModel (2 layers, hidden 128, 2 heads of 64), WordPiece
                tokenizer, sentence-transformers mean-pooling metadata.
  tiny-bert-rerank/  BertForSequenceClassification (num_labels=1), same tokenizer:
                a cross-encoder for /rerank and /score.

Weights are random (seeded), saved as safetensors. Everything is deterministic
for a given Python stdlib + library versions. Re-running skips a model whose
directory already has a .done marker.
"""

import glob
import json
import os
import shutil
import sys
import sysconfig

import torch

SEED = 1234

# Llama-3.1-flavoured chat template: system/user/assistant/tool turns, list-of-parts
# content, assistant tool_calls, and a tools block; enough for /v1/chat/completions,
# /v1/responses and /v1/messages to render any ordinary request.
LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}{{ '<|start_header_id|>system<|end_header_id|>\\n\\nYou may call these functions: '"
    " + (tools | tojson) + '<|eot_id|>' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['content'] is none %}{% set content = '' %}"
    "{% elif message['content'] is string %}{% set content = message['content'] %}"
    "{% else %}{% set content = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') %}{% endif %}"
    "{% set role = 'ipython' if message['role'] == 'tool' else message['role'] %}"
    "{{ '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' }}"
    "{% if message.get('tool_calls') %}{% for tc in message['tool_calls'] %}"
    "{% set args = tc['function']['arguments'] %}"
    "{{ '<|python_tag|>{\"name\": \"' + tc['function']['name'] + '\", \"parameters\": '"
    " + (args if args is string else args | tojson) + '}' }}"
    "{% endfor %}{{ '<|eom_id|>' }}"
    "{% else %}{{ content | trim + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Bump when the generated files change, so an old model dir is rebuilt.
GENERATOR_VERSION = "3"


def corpus_files(limit_bytes=6_000_000):
    """Local text to train tokenizers on: this Python's own stdlib sources."""
    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(stdlib, "*.py")))
    out, total = [], 0
    for f in files:
        try:
            size = os.path.getsize(f)
        except OSError:
            continue
        out.append(f)
        total += size
        if total >= limit_bytes:
            break
    return out


def text_iter(files):
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            yield fh.read()


def build_bpe_tokenizer(out_dir, files):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    # Llama 3.1's own special tokens (so --tool-call-parser llama3_json finds
    # <|python_tag|>), plus Hermes' <tool_call> pair for --tool-call-parser hermes.
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>", "<|pad|>", "<|python_tag|>", "<|eom_id|>",
                "<tool_call>", "</tool_call>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096, min_frequency=2, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text_iter(files), trainer=trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single="<|begin_of_text|> $A",
            pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
            special_tokens=[("<|begin_of_text|>", bos)]),
    ])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        pad_token="<|pad|>", model_max_length=2048, clean_up_tokenization_spaces=False)
    fast.chat_template = LLAMA_CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_wordpiece_tokenizer(out_dir, files):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=4096, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(text_iter(files), trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        pad_token="[PAD]", mask_token="[MASK]", model_max_length=512)
    fast.save_pretrained(out_dir)
    return fast


def done(d):
    try:
        with open(os.path.join(d, ".done")) as fh:
            return fh.read().strip() == GENERATOR_VERSION
    except OSError:
        return False


def fresh(d):
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)


def mark(d):
    with open(os.path.join(d, ".done"), "w") as fh:
        fh.write(GENERATOR_VERSION + "\n")


def make_llama(root, files):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    d = os.path.join(root, "tiny-llama")
    if done(d):
        return d
    fresh(d)
    tok = build_bpe_tokenizer(d, files)
    vocab = ((len(tok) + 63) // 64) * 64
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    eos = tok.convert_tokens_to_ids("<|end_of_text|>")
    eom = tok.convert_tokens_to_ids("<|eom_id|>")
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=[eot, eom, eos], pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(SEED)
    # bf16 on disk: vLLM's CPU backend runs bf16 (AVX512-BF16/AMX where present),
    # so --dtype auto needs no cast and logs no dtype warnings.
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(d)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=[eot, eom, eos],
                     pad_token_id=tok.pad_token_id).save_pretrained(d)
    mark(d)
    return d


def bert_config(vocab, **kw):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=256, max_position_embeddings=512, type_vocab_size=2,
                      pad_token_id=0, **kw)


def make_bert_embed(root, files):
    from transformers import BertModel

    d = os.path.join(root, "tiny-bert-embed")
    if done(d):
        return d
    fresh(d)
    tok = build_wordpiece_tokenizer(d, files)
    torch.manual_seed(SEED)
    model = BertModel(bert_config(((len(tok) + 63) // 64) * 64), add_pooling_layer=False)
    model.save_pretrained(d)
    # sentence-transformers metadata: mean pooling + normalisation.
    with open(os.path.join(d, "modules.json"), "w") as fh:
        json.dump([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ], fh, indent=2)
    os.makedirs(os.path.join(d, "1_Pooling"), exist_ok=True)
    with open(os.path.join(d, "1_Pooling", "config.json"), "w") as fh:
        json.dump({"word_embedding_dimension": 128, "pooling_mode_cls_token": False,
                   "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
                   "pooling_mode_mean_sqrt_len_tokens": False}, fh, indent=2)
    os.makedirs(os.path.join(d, "2_Normalize"), exist_ok=True)
    with open(os.path.join(d, "sentence_bert_config.json"), "w") as fh:
        json.dump({"max_seq_length": 512, "do_lower_case": True}, fh)
    mark(d)
    return d


def make_bert_rerank(root, files):
    from transformers import BertForSequenceClassification

    d = os.path.join(root, "tiny-bert-rerank")
    if done(d):
        return d
    fresh(d)
    tok = build_wordpiece_tokenizer(d, files)
    torch.manual_seed(SEED + 1)
    model = BertForSequenceClassification(bert_config(((len(tok) + 63) // 64) * 64, num_labels=1))
    model.save_pretrained(d)
    mark(d)
    return d


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "./tiny-models"
    os.makedirs(root, exist_ok=True)
    files = corpus_files()
    for fn in (make_llama, make_bert_embed, make_bert_rerank):
        print(fn(root, files))


if __name__ == "__main__":
    main()
