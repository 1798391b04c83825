package integration

import (
	"context"
	"fmt"
	"os"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/rs/zerolog"
	"github.com/shadowctl/shadowctl/integration/pgtest"
	"github.com/shadowctl/shadowctl/internal/catalog"
	"github.com/shadowctl/shadowctl/shadow"
)

// testDB is a fresh database with a pool and a runner on it.
type testDB struct {
	t      testing.TB
	DSN    string
	Pool   *pgxpool.Pool
	Runner *shadow.Runner
}

func newTestDB(t testing.TB) *testDB {
	t.Helper()
	pool, dsn := pgtest.NewPool(t)
	log := zerolog.New(zerolog.ConsoleWriter{Out: os.Stderr}).Level(zerolog.WarnLevel).With().Timestamp().Str("test", t.Name()).Logger()
	if os.Getenv("SHADOWCTL_TEST_LOG") != "" {
		log = log.Level(zerolog.DebugLevel)
	}
	db := &testDB{t: t, DSN: dsn, Pool: pool, Runner: shadow.NewRunner(pool, catalog.New(""), log)}
	// Issue 6, done-when 4: after every test, no replication slot and no
	// publication of the tool's is left (and the database could not be
	// dropped with a slot on it).
	t.Cleanup(func() {
		var slots, pubs int
		_ = pool.QueryRow(context.Background(), `SELECT (SELECT count(*) FROM pg_replication_slots WHERE database = current_database()),
			(SELECT count(*) FROM pg_publication)`).Scan(&slots, &pubs)
		if slots != 0 || pubs != 0 {
			t.Errorf("left behind: %d replication slots, %d publications", slots, pubs)
			_, _ = pool.Exec(context.Background(), `SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = current_database() AND NOT active`)
		}
	})
	return db
}

// ready submits req and drives it to ready. A logical migration is also
// aborted when the test ends, whatever the test did, so that no slot
// outlives it (a no-op once it is aborted, cut over or finalized).
func (db *testDB) ready(req shadow.Request) *shadow.Migration {
	db.t.Helper()
	ctx := context.Background()
	m, err := db.Runner.Submit(ctx, req)
	if err != nil {
		db.t.Fatalf("submit: %v", err)
	}
	if req.Sync == shadow.SyncLogical {
		db.t.Cleanup(func() { _ = db.Runner.Abort(context.WithoutCancel(ctx), m.ID, "") })
	}
	if m, err = db.Runner.Drive(ctx, m.ID, shadow.Ready); err != nil {
		db.t.Fatalf("drive to ready: %v", err)
	}
	if m.Phase != shadow.Ready {
		db.t.Fatalf("phase %s after drive, want ready", m.Phase)
	}
	return m
}

// forEachSyncMode runs a lifecycle test once per sync mode.
func forEachSyncMode(t *testing.T, fn func(t *testing.T, mode shadow.SyncMode)) {
	for _, mode := range []shadow.SyncMode{shadow.SyncTrigger, shadow.SyncLogical} {
		t.Run(string(mode), func(t *testing.T) { fn(t, mode) })
	}
}

// toolTriggersOnBlue counts shadowctl's triggers on public.orders.
func (db *testDB) toolTriggersOnBlue(ctx context.Context) int {
	var n int
	_ = db.Pool.QueryRow(ctx, `SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.orders'::regclass AND tgname LIKE 'shadowctl%'`).Scan(&n)
	return n
}

// exec runs SQL statements, failing the test on error.
func (db *testDB) exec(sqls ...string) {
	db.t.Helper()
	for _, s := range sqls {
		if _, err := db.Pool.Exec(context.Background(), s); err != nil {
			db.t.Fatalf("%s: %v", s, err)
		}
	}
}

// scalar runs a query returning one value.
func scalar[T any](db *testDB, sql string, args ...any) T {
	db.t.Helper()
	var v T
	if err := db.Pool.QueryRow(context.Background(), sql, args...).Scan(&v); err != nil {
		db.t.Fatalf("%s: %v", sql, err)
	}
	return v
}

// createOrders makes customers and orders tables like the demo's, with n orders.
func (db *testDB) createOrders(n int) {
	db.t.Helper()
	db.exec(
		`CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, email text)`,
		`INSERT INTO customers SELECT g, 'customer ' || g, 'c' || g || '@example.com' FROM generate_series(1, 1000) g`,
		`CREATE TABLE orders (
			id serial PRIMARY KEY,
			customer_id int REFERENCES customers,
			customer_name text,
			amount float8,
			status text DEFAULT 'new',
			created_at timestamptz DEFAULT now())`,
		`CREATE INDEX orders_customer_id_idx ON orders (customer_id)`,
		`CREATE INDEX orders_created_at_idx ON orders (created_at)`,
		fmt.Sprintf(`INSERT INTO orders (customer_id, customer_name, amount, status)
			SELECT 1 + g %% 1000, 'customer ' || (1 + g %% 1000), round((g * 7.31) %% 1000)::float8 / 3, 'new'
			FROM generate_series(1, %d) g`, n),
		`ANALYZE orders`,
	)
}

// assertGreenMatches checks green row for row against the mapping of blue,
// with an independent query (not the tool's verifier).
func (db *testDB) assertGreenMatches(blueSQL, greenSQL string) {
	db.t.Helper()
	q := fmt.Sprintf(`SELECT (SELECT count(*) FROM ((%[1]s) EXCEPT ALL (%[2]s)) a), (SELECT count(*) FROM ((%[2]s) EXCEPT ALL (%[1]s)) b), (SELECT count(*) FROM (%[1]s) c)`, blueSQL, greenSQL)
	var missing, extra, total int64
	if err := db.Pool.QueryRow(context.Background(), q).Scan(&missing, &extra, &total); err != nil {
		db.t.Fatalf("compare: %v", err)
	}
	if missing != 0 || extra != 0 {
		db.t.Fatalf("green differs from blue: %d rows of blue missing in green, %d extra in green (of %d)", missing, extra, total)
	}
}

// foreignKeysOf counts a table's foreign keys, and those of them validated.
func (db *testDB) foreignKeysOf(table string) (all, valid int) {
	db.t.Helper()
	if err := db.Pool.QueryRow(context.Background(), `SELECT count(*), count(*) FILTER (WHERE convalidated) FROM pg_constraint
		WHERE conrelid = $1::regclass AND contype = 'f'`, table).Scan(&all, &valid); err != nil {
		db.t.Fatal(err)
	}
	return all, valid
}

// dbOn is a testDB on the maintenance database of a cluster of the test's
// own (ownCluster, ownStandby), with a pool closed when the test ends.
func dbOn(t *testing.T, srv *pgtest.Server) *testDB {
	t.Helper()
	pool, err := pgxpool.New(context.Background(), srv.AdminDSN)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return &testDB{t: t, DSN: srv.AdminDSN, Pool: pool, Runner: shadow.NewRunner(pool, catalog.New(""), zerolog.Nop())}
}

// ownCluster starts a throwaway cluster of the test's own, with extra
// settings, for what the shared one must not change. Where no server
// binaries are found (SHADOWCTL_TEST_DSN only) the test is skipped, but
// never under CI=true.
func ownCluster(t *testing.T, why string, settings map[string]string) *pgtest.Server {
	t.Helper()
	bin := pgtest.Current(t).BinDir
	if bin == "" {
		if os.Getenv("CI") == "true" {
			t.Fatalf("no local server binaries to start a cluster %s", why)
		}
		t.Skipf("no local server binaries to start a cluster %s", why)
	}
	srv, err := pgtest.StartCluster(context.Background(), bin, pgtest.ClusterOptions{Settings: settings})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Stop)
	return srv
}
