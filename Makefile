# Fresh machine:  make demo   (venv + install + train ViCo on a bundled miniature-world concept from the shipped base model, sample, score)
#                 make test   (venv + install + the test suite)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)

.PHONY: demo demo-sd test install clean-demo

install: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(PY) main.py --base configs/miniworld/base.yaml configs/miniworld/vico.yaml -t -n demo --logdir logs \
		--data_root data/miniworld/sunset_ring --init_word ring
	$(PY) sample.py --ckpt "$$(ls -td logs/*_demo | head -n 1)/checkpoints/last.ckpt" \
		--ref data/miniworld/sunset_ring/00.png --from_file configs/miniworld/demo-prompts.txt \
		--n_samples 4 --n_iter 1 --ddim_steps 50 --scale 7.5 --save_attention --outdir outputs/demo
	$(PY) scripts/score_miniworld.py outputs/demo --concept data/miniworld/sunset_ring \
		--ckpt "$$(ls -td logs/*_demo | head -n 1)/checkpoints/last.ckpt"
	@echo "demo: grids, attention pictures and metrics.md in outputs/demo"

demo-sd: $(STAMP)
	$(PY) main.py --base configs/vico-tiny.yaml -t -n demo-sd --logdir logs
	$(PY) sample.py --ckpt "$$(ls -td logs/*_demo-sd | head -n 1)/checkpoints/last.ckpt" \
		--ref data/monster_toy/00.jpg --prompt "a photo of * on the beach" \
		--n_samples 4 --n_iter 1 --ddim_steps 20 --scale 7.5 --outdir outputs/demo-sd
	@echo "demo-sd samples (random weights: noise): outputs/demo-sd"

test: $(STAMP)
	$(PY) -m pytest -q

clean-demo:
	rm -rf logs/*_demo logs/*_demo-sd outputs/demo outputs/demo-sd
