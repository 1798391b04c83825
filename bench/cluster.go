package main

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"sort"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/shadowctl/shadowctl/integration/pgtest"
	"github.com/shadowctl/shadowctl/internal/pgsql"
)

// benchDB is where every scenario runs; seedDB holds the freshly loaded data
// it is cloned from before each scenario that needs a clean table.
const (
	benchDB = "bench"
	seedDB  = "bench_seed"
	// smallSeedDB holds BENCH_SCALE_FROM rows, for the in-run scale check.
	smallSeedDB = "bench_seed_small"
)

// pgSettings are the cluster's postgresql.conf lines beyond pgtest's defaults
// (wal_level=logical, max_connections=200, ...). Durable: fsync and
// synchronous_commit stay on. Sized for the bench machine (24 GiB, 2 cores).
var pgSettings = map[string]string{
	"shared_buffers":       "1GB",
	"max_wal_size":         "4GB",
	"checkpoint_timeout":   "15min",
	"maintenance_work_mem": "256MB",
	"effective_cache_size": "8GB",
}

// bench holds the run's cluster, database and work folder.
type bench struct {
	cfg      config
	srv      *pgtest.Server
	admin    string // the maintenance database
	dsn      string // the bench database, as a URL
	host     string
	port     uint16
	pool     *pgxpool.Pool
	work     string // pgbench logs, scripts, CLI output
	settings map[string]string
	machine  machine
	dirty    bool      // orders may differ from a fresh load
	cpu      *cpuClock // the machine's CPU through the run (nil: unknown)
}

// machine is what the numbers depend on.
type machine struct {
	Cores      int     `json:"cores"`
	MemoryGiB  float64 `json:"memory_gib"`
	CPUModel   string  `json:"cpu_model"`
	PGVersion  string  `json:"pg_version"`
	Pgbench    string  `json:"pgbench"`
	GoVersion  string  `json:"go"`
	KernelArch string  `json:"os_arch"`
	// LoadAvg is the 1-minute load average when the run began: other work
	// on the machine shows up in every figure.
	LoadAvg float64 `json:"load_avg_1m_at_start"`
}

// newBench starts the cluster and creates the database. A non-nil bench is
// returned with an error too, so that the caller's deferred Close stops
// whatever was started.
func newBench(ctx context.Context, cfg config) (*bench, error) {
	b := &bench{cfg: cfg}
	work, err := os.MkdirTemp("", "shadowctl-bench-")
	if err != nil {
		return nil, fmt.Errorf("work folder: %w", err)
	}
	b.work = work
	binDir, err := pgtest.FindBinDir()
	if err != nil {
		return b, fmt.Errorf("PostgreSQL server binaries (run `make postgres`): %w", err)
	}
	logf("starting a durable throwaway cluster from %s", binDir)
	srv, err := pgtest.StartCluster(ctx, binDir, pgtest.ClusterOptions{Durable: true, Settings: pgSettings})
	if err != nil {
		return b, fmt.Errorf("start cluster: %w", err)
	}
	b.srv = srv
	acfg, err := pgx.ParseConfig(srv.AdminDSN)
	if err != nil {
		return b, fmt.Errorf("parse admin DSN: %w", err)
	}
	b.host, b.port = acfg.Host, acfg.Port
	b.admin = srv.AdminDSN
	b.dsn = b.dbDSN(benchDB)
	if err := b.createSeed(ctx, seedDB, b.cfg.Rows); err != nil {
		return b, err
	}
	if b.cfg.ScaleFrom > 0 {
		if err := b.createSeed(ctx, smallSeedDB, b.cfg.ScaleFrom); err != nil {
			return b, err
		}
	}
	if err := b.fresh(ctx); err != nil {
		return b, err
	}
	if err := b.readSettings(ctx); err != nil {
		return b, err
	}
	b.machine = b.readMachine(ctx)
	return b, nil
}

// Close stops the cluster and removes the work folder (kept with BENCH_KEEP=1).
func (b *bench) Close() {
	if b.pool != nil {
		b.pool.Close()
	}
	if b.srv != nil {
		b.srv.Stop()
	}
	if b.work != "" {
		if b.cfg.Keep {
			logf("work folder kept: %s", b.work)
		} else {
			os.RemoveAll(b.work)
		}
	}
}

// readSettings records the settings in force that shape the numbers.
func (b *bench) readSettings(ctx context.Context) error {
	names := []string{"shared_buffers", "max_wal_size", "checkpoint_timeout", "maintenance_work_mem",
		"effective_cache_size", "work_mem", "fsync", "synchronous_commit", "full_page_writes", "wal_level",
		"max_parallel_maintenance_workers", "max_worker_processes", "wal_compression"}
	b.settings = map[string]string{}
	for _, n := range names {
		var v string
		if err := b.pool.QueryRow(ctx, "SELECT current_setting($1)", n).Scan(&v); err != nil {
			return fmt.Errorf("read setting %s: %w", n, err)
		}
		b.settings[n] = v
	}
	return nil
}

func (b *bench) readMachine(ctx context.Context) machine {
	m := machine{Cores: runtime.NumCPU(), GoVersion: runtime.Version(), KernelArch: runtime.GOOS + "/" + runtime.GOARCH}
	_ = b.pool.QueryRow(ctx, "SELECT version()").Scan(&m.PGVersion)
	if out, err := runOut(ctx, b.srv.BinDir+"/pgbench", "--version"); err == nil {
		m.Pgbench = strings.TrimSpace(out)
	}
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPUModel = strings.TrimSpace(v)
				break
			}
		}
		f.Close()
	}
	if f, err := os.Open("/proc/meminfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			var kb int64
			if _, err := fmt.Sscanf(sc.Text(), "MemTotal: %d kB", &kb); err == nil {
				m.MemoryGiB = round(float64(kb)/(1<<20), 1)
				break
			}
		}
		f.Close()
	}
	m.LoadAvg = loadAvg()
	return m
}

func (b *bench) dbDSN(db string) string {
	return fmt.Sprintf("postgres://postgres@%s:%d/%s?sslmode=disable", b.host, b.port, db)
}

// createSeed creates the seed database with customers and orders, loaded the
// fast way (rows first; key, foreign key and indexes after), vacuumed,
// analyzed and checkpointed. Values are deterministic functions of the row
// number.
func (b *bench) createSeed(ctx context.Context, seed string, rows int) error {
	start := time.Now()
	admin, err := pgx.Connect(ctx, b.admin)
	if err != nil {
		return fmt.Errorf("connect admin: %w", err)
	}
	_, err = admin.Exec(ctx, "CREATE DATABASE "+pgsql.Ident(seed))
	admin.Close(ctx)
	if err != nil {
		return fmt.Errorf("create seed database: %w", err)
	}
	c, err := pgx.Connect(ctx, b.dbDSN(seed))
	if err != nil {
		return fmt.Errorf("connect seed: %w", err)
	}
	defer c.Close(ctx)
	stmts := []string{
		`CREATE TABLE public.customers (id int PRIMARY KEY, name text NOT NULL, created_at timestamptz NOT NULL DEFAULT now())`,
		fmt.Sprintf(`INSERT INTO public.customers (id, name) SELECT i, 'customer ' || i FROM generate_series(1, %d) i`, b.cfg.Customers),
		`CREATE TABLE public.orders (
			id serial,
			customer_id int,
			customer_name text,
			amount float8,
			status text,
			created_at timestamptz DEFAULT now())`,
		fmt.Sprintf(`INSERT INTO public.orders (id, customer_id, customer_name, amount, status, created_at)
			SELECT i, c, 'customer ' || c, ((i::bigint * 7919) %% 100000) / 100.0,
			       (ARRAY['new','paid','shipped','delivered'])[1 + i %% 4],
			       timestamptz '2024-01-01' + make_interval(secs => i)
			FROM generate_series(1, %d) i, LATERAL (SELECT 1 + ((i::bigint * 104729) %% %d)::int AS c) x`,
			rows, b.cfg.Customers),
		fmt.Sprintf(`SELECT setval(pg_get_serial_sequence('public.orders', 'id'), %d)`, rows),
		`ALTER TABLE public.orders ADD PRIMARY KEY (id)`,
		`ALTER TABLE public.orders ADD FOREIGN KEY (customer_id) REFERENCES public.customers (id)`,
		`CREATE INDEX orders_customer_id_idx ON public.orders (customer_id)`,
		`CREATE INDEX orders_created_at_idx ON public.orders (created_at)`,
		`VACUUM (ANALYZE)`,
		`CHECKPOINT`,
	}
	for _, st := range stmts {
		if _, err := c.Exec(ctx, st); err != nil {
			return fmt.Errorf("load data: %s: %w", firstLine(st), err)
		}
	}
	logf("seed %s: customers %d rows, orders %d rows, loaded in %.1fs", seed, b.cfg.Customers, rows, time.Since(start).Seconds())
	return nil
}

// fresh replaces the bench database by a file-level clone of the seed, so
// every scenario that needs it starts from byte-identical data, whatever the
// previous one left (tables, views, schemas, triggers, publications). Logical
// slots on the old database are dropped first: they would block DROP DATABASE.
func (b *bench) fresh(ctx context.Context) error { return b.freshFrom(ctx, seedDB) }

// freshFrom is fresh with the clone taken from seed.
func (b *bench) freshFrom(ctx context.Context, seed string) error {
	start := time.Now()
	if b.pool != nil {
		b.pool.Close()
		b.pool = nil
	}
	admin, err := pgx.Connect(ctx, b.admin)
	if err != nil {
		return fmt.Errorf("connect admin: %w", err)
	}
	defer admin.Close(ctx)
	if _, err := admin.Exec(ctx, `SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
		WHERE database = $1 AND active_pid IS NOT NULL`, benchDB); err != nil {
		return fmt.Errorf("stop slot consumers: %w", err)
	}
	// A terminated walsender releases its slot as it exits: wait for that
	// (bounded), then drop every slot of the database.
	deadline := time.Now().Add(10 * time.Second)
	for {
		var active int
		if err := admin.QueryRow(ctx, `SELECT count(*) FROM pg_replication_slots WHERE database = $1 AND active`, benchDB).Scan(&active); err != nil {
			return fmt.Errorf("slots: %w", err)
		}
		if active == 0 {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d replication slots of %s still active after their consumers were terminated", active, benchDB)
		}
		// Polling a catalog view: PostgreSQL offers nothing to wait on here.
		time.Sleep(50 * time.Millisecond)
	}
	if _, err := admin.Exec(ctx, `SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1`, benchDB); err != nil {
		return fmt.Errorf("drop slots: %w", err)
	}
	for _, st := range []string{
		"DROP DATABASE IF EXISTS " + pgsql.Ident(benchDB) + " WITH (FORCE)",
		"CREATE DATABASE " + pgsql.Ident(benchDB) + " TEMPLATE " + pgsql.Ident(seed) + " STRATEGY FILE_COPY",
	} {
		if _, err := admin.Exec(ctx, st); err != nil {
			return fmt.Errorf("%s: %w", st, err)
		}
	}
	if b.pool, err = pgxpool.New(ctx, b.dsn); err != nil {
		return fmt.Errorf("pool: %w", err)
	}
	logf("fresh %s database cloned from %s in %.1fs", benchDB, seed, time.Since(start).Seconds())
	return nil
}

// checkpoint flushes dirty buffers so that a measurement does not pay for the
// previous one's writes.
func (b *bench) checkpoint(ctx context.Context) error {
	if _, err := b.pool.Exec(ctx, "CHECKPOINT"); err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	return nil
}

func sortedKeys(m map[string]string) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

func firstLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i] + " …"
	}
	return s
}

// runOut runs a short command and returns its standard output.
func runOut(ctx context.Context, name string, args ...string) (string, error) {
	out, err := exec.CommandContext(ctx, name, args...).Output()
	if err != nil {
		return "", fmt.Errorf("%s: %w", name, err)
	}
	return string(out), nil
}
