# Two commands do everything: `make pipeline` runs every stage on the built-in sample dataset,
# `make test` runs the test suite. Both create .venv and install requirements.txt when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum < requirements.txt | cut -d' ' -f1)
REAL_DATA := ../shared/data/utkface_sample

.PHONY: pipeline test smoke-real bench

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	rm -f $(VENV)/.installed-* && touch $(STAMP)

pipeline: $(STAMP)
	$(PY) make_sample_dataset.py
	$(PY) explore_images.py
	$(PY) process_images.py
	$(PY) visualize_image_information.py
	$(PY) run_notebook.py australian_population.ipynb
	$(PY) run_notebook.py resampling.ipynb
	$(PY) train_model.py
	$(PY) predict_age.py

test: $(STAMP)
	$(PY) -m pytest

# Optional: explore, process and train on real UTKFace faces, when ../shared/data is present
# (the model is tested on a held-out 15% of them). Everything goes to real_data/, beside the sample
# pipeline's folders and never inside them.
smoke-real: $(STAMP)
	@if [ -d $(REAL_DATA) ]; then \
		$(PY) explore_images.py --set dataset_dir=$(REAL_DATA) \
			--set output_csv=real_data/csv/image_metadata.csv --set summary_csv=real_data/csv/image_metadata_summary.csv && \
		$(PY) process_images.py --set input_csv=real_data/csv/image_metadata.csv --set output_dir=real_data/processed_dataset \
			--set output_csv=real_data/csv/processed_metadata.csv && \
		$(PY) train_model.py --set input_csv=real_data/csv/processed_metadata.csv --set output_dir=real_data/model; \
	else echo "skipping real-data smoke run: $(REAL_DATA) not found"; fi

bench: $(STAMP)
	$(PY) benchmarks/bench_explore.py $(REAL_DATA)
	$(PY) benchmarks/bench_faces.py $(REAL_DATA)
	$(PY) benchmarks/bench_scale.py
	$(PY) benchmarks/bench_process.py $(REAL_DATA)
	$(PY) benchmarks/bench_model.py $(REAL_DATA)
