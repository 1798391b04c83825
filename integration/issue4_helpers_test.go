package integration

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/shadowctl/shadowctl/internal/pgsql"
	"github.com/shadowctl/shadowctl/shadow"
)

// issue4Alter is the change the issue-4 tests migrate with: a type change
// that makes the view's column types differ from blue's.
const issue4Alter = "ALTER COLUMN amount TYPE numeric(12,2)"

// readyMigration submits alter on table and drives it to ready.
func (db *testDB) readyMigration(table, alter string) string {
	db.t.Helper()
	return db.ready(shadow.Request{Table: table, Alter: alter, BatchSize: 1000}).ID
}

// relkind is pg_class.relkind of name, "" when there is no such relation.
func (db *testDB) relkind(name string) string {
	db.t.Helper()
	return scalar[string](db, `SELECT coalesce((SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1)), '')`, name)
}

// get reads a migration afresh from the catalog.
func (db *testDB) get(id string) *shadow.Migration {
	db.t.Helper()
	m, err := db.Runner.Store.Get(context.Background(), db.Pool, id)
	if err != nil {
		db.t.Fatal(err)
	}
	return m
}

// assertServes checks that the catalog (through StatusOf of a fresh read) and
// the database agree: phase is want, public.<table> is a view over green
// (serving "green") or the table itself ("blue").
func (db *testDB) assertServes(id string, table pgsql.QualifiedName, want shadow.Phase, serving string) {
	db.t.Helper()
	st := shadow.StatusOf(db.get(id), time.Now())
	kind := db.relkind(table.Quoted())
	wantKind := map[string]string{"green": "v", "blue": "r"}[serving]
	if st.Phase != string(want) || st.Serving != serving || kind != wantKind {
		db.t.Fatalf("status says phase %s serving %s, and %s has relkind %q; want phase %s serving %s (relkind %q)",
			st.Phase, st.Serving, table, kind, want, serving, wantKind)
	}
}

// connectAs opens a connection to the test database as role (trust auth),
// with the simple protocol (no cached plans across the swap).
func (db *testDB) connectAs(role string) *pgx.Conn {
	db.t.Helper()
	cfg, err := pgx.ParseConfig(db.DSN)
	if err != nil {
		db.t.Fatal(err)
	}
	if role != "" {
		cfg.User = role
	}
	cfg.DefaultQueryExecMode = pgx.QueryExecModeSimpleProtocol
	c, err := pgx.ConnectConfig(context.Background(), cfg)
	if err != nil {
		db.t.Fatalf("connect as %q: %v", role, err)
	}
	db.t.Cleanup(func() { _ = c.Close(context.Background()) })
	return c
}

// newRole creates a LOGIN role with a unique name (roles are cluster-wide and
// tests run in parallel databases) and drops it when the test ends.
func (db *testDB) newRole(prefix string) string {
	db.t.Helper()
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	name := prefix + "_" + hex.EncodeToString(b)
	db.exec("CREATE ROLE " + pgsql.Ident(name) + " LOGIN")
	db.t.Cleanup(func() {
		ctx := context.Background()
		// The database is dropped after this cleanup (cleanups run last
		// first): remove what the role owns or was granted here first.
		_, _ = db.Pool.Exec(ctx, "DROP OWNED BY "+pgsql.Ident(name))
		if c, err := pgx.Connect(ctx, db.DSN); err == nil {
			_, _ = c.Exec(ctx, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", name)
			_, _ = c.Exec(ctx, "DROP ROLE IF EXISTS "+pgsql.Ident(name))
			_ = c.Close(ctx)
		}
	})
	return name
}

// backendPID is the server pid of a connection.
func backendPID(c *pgx.Conn) uint32 { return c.PgConn().PID() }

// waitUntil polls cond (a condition on the database, not a guess at how long
// something takes) until it holds or the bound passes.
func waitUntil(t testing.TB, what string, bound time.Duration, cond func() bool) {
	t.Helper()
	waitFor(t, what, bound, func() (bool, error) { return cond(), nil })
}

// app is the test database seen by an application: a pool without a
// server-side prepared-statement cache (a cached plan whose result type
// changes fails once per connection after the swap, a documented PostgreSQL
// limit tested elsewhere). The runner keeps using db.Pool.
func (db *testDB) app() *testDB {
	db.t.Helper()
	cfg, err := pgxpool.ParseConfig(db.DSN)
	if err != nil {
		db.t.Fatal(err)
	}
	cfg.ConnConfig.DefaultQueryExecMode = pgx.QueryExecModeExec
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		db.t.Fatal(err)
	}
	db.t.Cleanup(pool.Close)
	return &testDB{t: db.t, DSN: db.DSN, Pool: pool, Runner: db.Runner}
}

func timeNow() time.Time { return time.Now() }

// walkSwaps drives a ready migration through cutover, rollback, cutover again
// and finalize. Before each step it lets w (when not nil) make progress;
// after it, it asserts the phase and which side serves table, then calls
// after with the step's name and the side that serves ("" once finalized).
func (db *testDB) walkSwaps(id string, table pgsql.QualifiedName, w *workload, after func(stage, serving string)) {
	db.t.Helper()
	ctx := context.Background()
	opts := shadow.CutoverOptions{}
	steps := []struct {
		name    string
		fn      func() (*shadow.Migration, error)
		want    shadow.Phase
		serving string
	}{
		{"cutover", func() (*shadow.Migration, error) { return db.Runner.Cutover(ctx, id, opts) }, shadow.CutOver, "green"},
		{"rollback", func() (*shadow.Migration, error) { return db.Runner.Rollback(ctx, id, opts) }, shadow.RolledBack, "blue"},
		{"cutover again", func() (*shadow.Migration, error) { return db.Runner.Cutover(ctx, id, opts) }, shadow.CutOver, "green"},
		{"finalize", func() (*shadow.Migration, error) { return db.Runner.Finalize(ctx, id, 0, true, opts) }, shadow.Finalized, ""},
	}
	for _, s := range steps {
		if w != nil {
			w.waitOps(50)
		}
		m, err := s.fn()
		if err != nil {
			db.t.Fatalf("%s: %v", s.name, err)
		}
		if m.Phase != s.want {
			db.t.Fatalf("%s: phase %s, want %s", s.name, m.Phase, s.want)
		}
		if s.want != shadow.Finalized {
			db.assertServes(id, table, s.want, s.serving)
		}
		after(s.name, s.serving)
	}
}
