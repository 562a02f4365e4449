# Fresh machine:  make demo   (venv + install + train the tiny config on bundled photos + sample)
#                 make test   (venv + install + the test suite)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)

.PHONY: demo test install clean-demo

install: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(PY) main.py --base configs/vico-tiny.yaml -t -n demo --logdir logs
	$(PY) sample.py --ckpt "$$(ls -td logs/*_demo | head -n 1)/checkpoints/last.ckpt" \
		--ref data/monster_toy/00.jpg --prompt "a photo of * on the beach" \
		--n_samples 4 --n_iter 1 --ddim_steps 20 --scale 7.5 --outdir outputs/demo
	@echo "demo samples: outputs/demo"

test: $(STAMP)
	$(PY) -m pytest -q

clean-demo:
	rm -rf logs/*_demo outputs/demo
