# shadowctl — see README.md. Every target installs what it needs.
GO        ?= go
BIN       := bin/shadowctl
PKGS      := ./...
TEST_TIMEOUT ?= 25m

.PHONY: all build test test-short demo bench bench-quick bench-scale soak lint fmt deps postgres clean

all: build

deps:
	$(GO) mod download

postgres:
	@bash scripts/ensure-postgres.sh

build: deps
	$(GO) build -o $(BIN) ./cmd/shadowctl

# The whole suite against real PostgreSQL (a throwaway cluster per package), race detector on.
test: deps postgres
	$(GO) test -race -count=1 -timeout $(TEST_TIMEOUT) -p 2 $(PKGS)

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)

fmt:
	gofmt -w $$(git ls-files '*.go')

# The demo: a throwaway PostgreSQL, 1M orders under live load, the whole lifecycle.
demo: build postgres
	./$(BIN) demo

bench: build postgres
	$(GO) run ./bench

bench-quick: build postgres
	BENCH_ROWS=200000 BENCH_SECONDS=10 $(GO) run ./bench

# The scale targets in one run: time to ready at idle, and a cutover under
# the workload after each, at 8,000,000 and 2,000,000 rows alternately
# (three of each). No load runs: at 8,000,000 rows their figures are not
# targets, and the swaps come from the alternated runs.
bench-scale: build postgres
	BENCH_ROWS=8000000 BENCH_SCALE_FROM=2000000 BENCH_ONLY=raw,trigger,logical,idle BENCH_IDLE_REPS=3 $(GO) run ./bench

soak: deps postgres
	$(GO) test -tags soak -race -count=1 -timeout 90m -run Soak ./integration/...

clean:
	rm -rf bin
