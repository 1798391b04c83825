package integration

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/shadowctl/shadowctl/backfill"
	"github.com/shadowctl/shadowctl/shadow"
)

// Issue 3, done-when 6: bad requests are refused with an error that carries
// its sentinel (errors.Is) and names the object and the fix, and the database
// is left exactly as it was (full schema fingerprint, catalog excluded; no
// tool object left).
func TestIssue3BadRequests(t *testing.T) {
	db := newTestDB(t)
	ctx := context.Background()
	db.exec(
		`CREATE TABLE accounts (id int PRIMARY KEY, code text NOT NULL UNIQUE, name text NOT NULL, note text,
			total int GENERATED ALWAYS AS (id * 2) STORED)`,
		`INSERT INTO accounts (id, code, name, note) SELECT g, 'c' || g, 'n' || g, 'note' FROM generate_series(1, 50) g`,
		`CREATE TABLE "MixedCase" (id int PRIMARY KEY)`,
		`CREATE TABLE nokey (a int, b text)`,
		`CREATE TABLE nullable_unique (a int UNIQUE, b text)`,
		`CREATE TABLE textnums (id int PRIMARY KEY, v text)`,
		`INSERT INTO textnums VALUES (1, '10'), (2, '20'), (3, 'thirty'), (4, '40')`,
		`CREATE VIEW plain_view AS SELECT 1 AS x`,
		`CREATE MATERIALIZED VIEW mat_view AS SELECT 1 AS x`,
		`CREATE TABLE parted (id int, k int, PRIMARY KEY (id, k)) PARTITION BY RANGE (k)`,
		`CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (100)`,
		`CREATE TABLE with_dependent (id int PRIMARY KEY, v text)`,
		`CREATE VIEW dependent_view AS SELECT id, v FROM with_dependent`,
		`CREATE TABLE with_exclusion (id int PRIMARY KEY, during int4range, EXCLUDE USING gist (during WITH &&))`,
		`CREATE TABLE busy (id int PRIMARY KEY, v text)`,
		`CREATE EXTENSION file_fdw`,
		`CREATE SERVER files FOREIGN DATA WRAPPER file_fdw`,
		`CREATE FOREIGN TABLE foreign_rows (id int) SERVER files OPTIONS (filename '/dev/null')`,
		`CREATE SCHEMA other`,
		`CREATE TABLE other.accounts (id int)`,
	)
	// A temporary table lives in another session's temp schema.
	tempConn, err := db.Pool.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tempConn.Release()
	var tempSchema string
	if _, err := tempConn.Exec(ctx, `CREATE TEMP TABLE temp_rows (id int PRIMARY KEY)`); err != nil {
		t.Fatal(err)
	}
	if err := tempConn.QueryRow(ctx, `SELECT nspname FROM pg_namespace WHERE oid = pg_my_temp_schema()`).Scan(&tempSchema); err != nil {
		t.Fatal(err)
	}

	// A migration that holds busy, and one that was aborted (its id stays taken).
	busy, err := db.Runner.Submit(ctx, shadow.Request{Table: "busy", Alter: "ADD COLUMN x int", ID: "busy-one"})
	if err != nil {
		t.Fatal(err)
	}
	old, err := db.Runner.Submit(ctx, shadow.Request{Table: "accounts", Alter: "ADD COLUMN x int", ID: "old-one"})
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Runner.Abort(ctx, old.ID, ""); err != nil {
		t.Fatal(err)
	}

	before := dbFingerprint(t, db, "shadowctl")
	alter := "ADD COLUMN extra int"
	cases := []struct {
		name string
		req  shadow.Request
		is   error
		msg  []string // each must appear in the message
	}{
		{"no such table", shadow.Request{Table: "nosuch", Alter: alter}, shadow.ErrNoSuchTable, []string{"nosuch"}},
		{"no such qualified table", shadow.Request{Table: "public.nosuch", Alter: alter}, shadow.ErrNoSuchTable, []string{`"public"."nosuch"`, "--dsn"}},
		{"no such schema", shadow.Request{Table: "nowhere.accounts", Alter: alter}, shadow.ErrNoSuchTable, []string{"nowhere"}},
		{"a view", shadow.Request{Table: "plain_view", Alter: alter}, shadow.ErrNotPlainTable, []string{"plain_view", "is a view"}},
		{"a materialized view", shadow.Request{Table: "mat_view", Alter: alter}, shadow.ErrNotPlainTable, []string{"mat_view", "view"}},
		{"a partitioned table", shadow.Request{Table: "parted", Alter: alter}, shadow.ErrNotPlainTable, []string{"parted", "partitioned"}},
		{"a partition", shadow.Request{Table: "parted_1", Alter: alter}, shadow.ErrNotPlainTable, []string{"parted_1", "partitioning"}},
		{"a foreign table", shadow.Request{Table: "foreign_rows", Alter: alter}, shadow.ErrNotPlainTable, []string{"foreign_rows", "foreign table"}},
		{"a temporary table", shadow.Request{Table: tempSchema + ".temp_rows", Alter: alter}, shadow.ErrNotPlainTable, []string{"temp_rows", "temporary"}},
		{"no primary key", shadow.Request{Table: "nokey", Alter: alter}, shadow.ErrNoKey, []string{"nokey", "ADD PRIMARY KEY"}},
		{"unique on a nullable column only", shadow.Request{Table: "nullable_unique", Alter: alter}, shadow.ErrNoKey, []string{"nullable_unique", "NOT NULL"}},
		{"ALTER syntax error", shadow.Request{Table: "accounts", Alter: "ADD COLUMN"}, shadow.ErrBadAlter, []string{"syntax error"}},
		{"ALTER unbalanced parentheses", shadow.Request{Table: "accounts", Alter: "ADD COLUMN x numeric(12,2"}, shadow.ErrBadAlter, []string{"parenthes"}},
		{"ALTER names a missing column", shadow.Request{Table: "accounts", Alter: "ALTER COLUMN nosuchcol TYPE bigint"}, shadow.ErrBadAlter, []string{"nosuchcol", "does not exist"}},
		{"ALTER drops the key", shadow.Request{Table: "accounts", Alter: "DROP CONSTRAINT accounts_pkey, DROP CONSTRAINT accounts_code_key"}, shadow.ErrGreenNoKey, []string{"accounts", "primary key"}},
		{"ALTER drops blue's key column, another key stays", shadow.Request{Table: "accounts", Alter: "DROP COLUMN id CASCADE, ADD PRIMARY KEY (code)", ReverseMap: map[string]string{"id": "0"}}, shadow.ErrKeyDropped, []string{`"id"`, "key column"}},
		{"type change without an assignment cast or USING", shadow.Request{Table: "textnums", Alter: "ALTER COLUMN v TYPE integer"}, shadow.ErrBadAlter, []string{`"v"`, "USING"}},
		{"dropped column without --reverse-map", shadow.Request{Table: "accounts", Alter: "DROP COLUMN name"}, shadow.ErrNoReverseMapping, []string{`"name"`, "--reverse-map name="}},
		{"--map to a missing column", shadow.Request{Table: "accounts", Alter: alter, Map: map[string]string{"nosuchcol": "1"}}, shadow.ErrBadMapping, []string{"nosuchcol"}},
		{"--map to a generated column", shadow.Request{Table: "accounts", Alter: alter, Map: map[string]string{"total": "1"}}, shadow.ErrBadMapping, []string{"total", "generated"}},
		{"--map expression that does not compile", shadow.Request{Table: "accounts", Alter: alter, Map: map[string]string{"extra": "nosuchfn(id)"}}, shadow.ErrBadMapping, []string{"nosuchfn"}},
		{"--reverse-map to a missing blue column", shadow.Request{Table: "accounts", Alter: alter, ReverseMap: map[string]string{"nosuchcol": "1"}}, shadow.ErrBadMapping, []string{"nosuchcol"}},
		{"a name needing quotes given unquoted", shadow.Request{Table: "MixedCase", Alter: alter}, shadow.ErrNoSuchTable, []string{`"MixedCase"`}},
		{"a name with a space unquoted", shadow.Request{Table: "public.Mixed Case", Alter: alter}, shadow.ErrBadRequest, []string{"Mixed Case", "quote"}},
		{"a second migration on the same table", shadow.Request{Table: "busy", Alter: alter}, shadow.ErrTableBusy, []string{"busy", busy.ID, "shadowctl drive " + busy.ID, "abort"}},
		{"an id that is taken", shadow.Request{Table: "accounts", Alter: alter, ID: old.ID}, shadow.ErrIDTaken, []string{old.ID, "--name"}},
		{"storage over budget", shadow.Request{Table: "accounts", Alter: alter, MaxExtraStorage: 1}, shadow.ErrStorageBudget, []string{"accounts", "--max-extra-storage"}},
		{"green schema is the table's schema", shadow.Request{Table: "accounts", Alter: alter, GreenSchema: "public"}, shadow.ErrBadRequest, []string{"--green-schema", "public"}},
		{"a dependent view", shadow.Request{Table: "with_dependent", Alter: alter}, shadow.ErrDependents, []string{"dependent_view"}},
		{"an exclusion constraint", shadow.Request{Table: "with_exclusion", Alter: alter}, shadow.ErrUnsupported, []string{"with_exclusion_during_excl", "exclusion"}},
		{"green table exists in --green-schema", shadow.Request{Table: "accounts", Alter: alter, GreenSchema: "other"}, shadow.ErrGreenExists, []string{`"other"."accounts"`, "--green-schema"}},
		{"--sync bogus", shadow.Request{Table: "accounts", Alter: alter, Sync: "bogus"}, shadow.ErrBadRequest, []string{"--sync", "bogus"}},
		{"empty --alter", shadow.Request{Table: "accounts", Alter: "  "}, shadow.ErrBadRequest, []string{"--alter"}},
		{"the whole ALTER TABLE statement", shadow.Request{Table: "accounts", Alter: "ALTER TABLE accounts ADD COLUMN x int"}, shadow.ErrBadAlter, []string{"not the whole statement"}},
		{"a bad --name", shadow.Request{Table: "accounts", Alter: alter, ID: "has space"}, shadow.ErrBadRequest, []string{"--name", "has space"}},
		{"no --table", shadow.Request{Alter: alter}, shadow.ErrBadRequest, []string{"--table"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := db.Runner.Submit(ctx, c.req)
			if err == nil {
				t.Fatal("accepted")
			}
			if !errors.Is(err, c.is) {
				t.Fatalf("error %q is not %q", err, c.is)
			}
			for _, s := range c.msg {
				if !strings.Contains(err.Error(), s) {
					t.Fatalf("error %q does not mention %q", err, s)
				}
			}
			t.Logf("%v", err)
			assertSameSchema(t, c.name, before, dbFingerprint(t, db, "shadowctl"))
		})
	}
	if len(cases) < 20 {
		t.Fatalf("only %d bad requests", len(cases))
	}

	// A type change that fails on existing data fails in the copy: the
	// migration is aborted at once, the error names the row's key and
	// PostgreSQL's error, and the database is as it was.
	t.Run("a type change that fails on a row", func(t *testing.T) {
		m, err := db.Runner.Submit(ctx, shadow.Request{Table: "textnums", Alter: "ALTER COLUMN v TYPE integer USING v::integer"})
		if err != nil {
			t.Fatal(err)
		}
		_, err = db.Runner.Drive(ctx, m.ID, shadow.Ready)
		if err == nil {
			t.Fatal("the copy of a non-numeric text into integer succeeded")
		}
		if !errors.Is(err, backfill.ErrBadRow) {
			t.Fatalf("error %q is not ErrBadRow", err)
		}
		for _, s := range []string{"(id) = (3)", "thirty", "22P02", "removed"} {
			if !strings.Contains(err.Error(), s) {
				t.Fatalf("error %q does not mention %q", err, s)
			}
		}
		got, err := db.Runner.Store.Get(ctx, db.Pool, m.ID)
		if err != nil {
			t.Fatal(err)
		}
		if got.Phase != shadow.Aborted || !strings.Contains(got.Error, "(id) = (3)") {
			t.Fatalf("catalog says %s / %q, want aborted with the row's key", got.Phase, got.Error)
		}
		assertSameSchema(t, "after the failed copy", before, dbFingerprint(t, db, "shadowctl"))
	})
	// The same refusals through the command line: a non-zero exit and the
	// message on stderr.
	for _, c := range []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"start", "--table", "nosuch", "--alter", alter}, 1, "no such table"},
		{[]string{"start", "--table", "accounts", "--alter", alter, "--map", "extra"}, 2, "write column=SQL-expression"},
		{[]string{"start", "--table", "accounts", "--alter", alter, "--max-extra-storage", "lots"}, 2, "use a number with an optional unit"},
		{[]string{"start", "--table", "accounts", "--alter", "DROP COLUMN name"}, 1, "--reverse-map name="},
		{[]string{"drive", "no-such-migration"}, 1, "no such migration"},
	} {
		res := runCLI(t, nil, append([]string{"--dsn", db.DSN}, c.args...)...)
		if res.Code != c.code || !strings.Contains(res.Stderr, c.msg) {
			t.Fatalf("shadowctl %v: exit %d, stderr %q; want exit %d mentioning %q", c.args, res.Code, res.Stderr, c.code, c.msg)
		}
		assertSameSchema(t, strings.Join(c.args, " "), before, dbFingerprint(t, db, "shadowctl"))
	}

	if err := db.Runner.Abort(ctx, busy.ID, ""); err != nil {
		t.Fatal(err)
	}
	assertNoToolObjects(t, db, "green")
}
