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

const benchDB = "bench"

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
	dsn      string // the bench database, as a URL
	host     string
	port     uint16
	pool     *pgxpool.Pool
	work     string // pgbench logs, scripts, CLI output
	settings map[string]string
	machine  machine
	dirty    bool // orders may differ from a fresh load
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
	admin, err := pgx.Connect(ctx, srv.AdminDSN)
	if err != nil {
		return b, fmt.Errorf("connect admin: %w", err)
	}
	defer admin.Close(ctx)
	if _, err := admin.Exec(ctx, "CREATE DATABASE "+pgsql.Ident(benchDB)); err != nil {
		return b, fmt.Errorf("create database: %w", err)
	}
	acfg, err := pgx.ParseConfig(srv.AdminDSN)
	if err != nil {
		return b, fmt.Errorf("parse admin DSN: %w", err)
	}
	b.host, b.port = acfg.Host, acfg.Port
	b.dsn = fmt.Sprintf("postgres://%s@%s:%d/%s?sslmode=disable", acfg.User, acfg.Host, acfg.Port, benchDB)
	if b.pool, err = pgxpool.New(ctx, b.dsn); err != nil {
		return b, fmt.Errorf("pool: %w", err)
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

// loadData creates customers (once) and orders (every call: a fresh, identical
// table), then vacuums, analyzes and checkpoints so that every scenario starts
// from the same state. Values are deterministic functions of the row number.
func (b *bench) loadData(ctx context.Context) error {
	start := time.Now()
	c, err := b.pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("acquire: %w", err)
	}
	defer c.Release()
	var haveCustomers bool
	if err := c.QueryRow(ctx, "SELECT to_regclass('public.customers') IS NOT NULL").Scan(&haveCustomers); err != nil {
		return fmt.Errorf("look for customers: %w", err)
	}
	stmts := []string{}
	if !haveCustomers {
		stmts = append(stmts,
			`CREATE TABLE public.customers (id int PRIMARY KEY, name text NOT NULL, created_at timestamptz NOT NULL DEFAULT now())`,
			fmt.Sprintf(`INSERT INTO public.customers (id, name) SELECT i, 'customer ' || i FROM generate_series(1, %d) i`, b.cfg.Customers),
			`VACUUM (ANALYZE) public.customers`)
	}
	// Load first, then key, foreign key and indexes: the fast path for a fresh table.
	stmts = append(stmts,
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
			b.cfg.Rows, b.cfg.Customers),
		fmt.Sprintf(`SELECT setval(pg_get_serial_sequence('public.orders', 'id'), %d)`, b.cfg.Rows),
		`ALTER TABLE public.orders ADD PRIMARY KEY (id)`,
		`ALTER TABLE public.orders ADD FOREIGN KEY (customer_id) REFERENCES public.customers (id)`,
		`CREATE INDEX orders_customer_id_idx ON public.orders (customer_id)`,
		`CREATE INDEX orders_created_at_idx ON public.orders (created_at)`,
		`VACUUM (ANALYZE) public.orders`,
		`CHECKPOINT`)
	for _, s := range stmts {
		if _, err := c.Exec(ctx, s); err != nil {
			return fmt.Errorf("load data: %s: %w", firstLine(s), err)
		}
	}
	logf("orders: %d rows loaded in %.1fs", b.cfg.Rows, time.Since(start).Seconds())
	return nil
}

// resetOrders returns the database to a clean slate whatever a scenario left:
// every schema but public (and pg_repack's), every relation and function in
// public but customers, replication slots and publications, then fresh orders.
// The bench owns this cluster, so nothing else can live there.
func (b *bench) resetOrders(ctx context.Context) error {
	if err := b.dropLeftovers(ctx); err != nil {
		return err
	}
	return b.loadData(ctx)
}

func (b *bench) dropLeftovers(ctx context.Context) error {
	c, err := b.pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("acquire: %w", err)
	}
	defer c.Release()
	var drops []string
	collect := func(q string, render func(a, b string) string) error {
		rows, err := c.Query(ctx, q)
		if err != nil {
			return fmt.Errorf("reset: list: %w", err)
		}
		defer rows.Close()
		for rows.Next() {
			var x, y string
			if err := rows.Scan(&x, &y); err != nil {
				return fmt.Errorf("reset: scan: %w", err)
			}
			drops = append(drops, render(x, y))
		}
		return rows.Err()
	}
	if err := collect(`SELECT slot_name::text, '' FROM pg_replication_slots WHERE NOT active`,
		func(a, _ string) string { return "SELECT pg_drop_replication_slot(" + pgsql.Literal(a) + ")" }); err != nil {
		return err
	}
	if err := collect(`SELECT pubname::text, '' FROM pg_publication`,
		func(a, _ string) string { return "DROP PUBLICATION IF EXISTS " + pgsql.Ident(a) }); err != nil {
		return err
	}
	if err := collect(`SELECT n.nspname::text, '' FROM pg_namespace n
		WHERE n.nspname NOT IN ('public', 'information_schema', 'repack') AND n.nspname NOT LIKE 'pg\_%'`,
		func(a, _ string) string { return "DROP SCHEMA IF EXISTS " + pgsql.Ident(a) + " CASCADE" }); err != nil {
		return err
	}
	if err := collect(`SELECT c.relname::text, CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW' ELSE 'TABLE' END
		FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
		WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm') AND c.relname <> 'customers'`,
		func(a, kind string) string {
			return "DROP " + kind + " IF EXISTS " + pgsql.QualifiedName{Schema: "public", Name: a}.Quoted() + " CASCADE"
		}); err != nil {
		return err
	}
	if err := collect(`SELECT p.oid::regprocedure::text, '' FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
		LEFT JOIN pg_depend d ON d.objid = p.oid AND d.deptype = 'e'
		WHERE n.nspname = 'public' AND d.objid IS NULL`,
		// regprocedure's text form is already a quoted signature.
		func(a, _ string) string { return "DROP FUNCTION IF EXISTS " + a + " CASCADE" }); err != nil {
		return err
	}
	for _, d := range drops {
		if _, err := c.Exec(ctx, d); err != nil {
			return fmt.Errorf("reset: %s: %w", d, err)
		}
	}
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
