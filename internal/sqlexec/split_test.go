package sqlexec

import (
	"errors"
	"reflect"
	"testing"
)

func TestSplitRespectsQuotesCommentsAndBodies(t *testing.T) {
	src := `-- leading comment; not a statement
CREATE TABLE "a;b" (id int, note text DEFAULT 'x;y', CHECK (note <> ';'));
/* block; /* nested; */ still comment */
INSERT INTO t VALUES (E'it\'s; fine', $$dollar; quoted$$, $tag$ $$ ; $tag$);
CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $fn$
BEGIN
  RETURN 1; -- inner
END
$fn$;
CREATE FUNCTION g(x int) RETURNS int LANGUAGE sql
BEGIN ATOMIC
  SELECT CASE WHEN x > 0 THEN 1 ELSE 0 END;
  SELECT 2;
END;
CREATE RULE r AS ON INSERT TO t DO ALSO (NOTIFY a; NOTIFY b);
;;
SELECT $1::int, a$b FROM t
`
	stmts, err := Split(src)
	if err != nil {
		t.Fatal(err)
	}
	var firsts []string
	var lines []int
	for _, s := range stmts {
		firsts = append(firsts, s.FirstLine())
		lines = append(lines, s.Line)
	}
	want := []string{
		`CREATE TABLE "a;b" (id int, note text DEFAULT 'x;y', CHECK (note <> ';'))`,
		`INSERT INTO t VALUES (E'it\'s; fine', $$dollar; quoted$$, $tag$ $$ ; $tag$)`,
		`CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $fn$`,
		`CREATE FUNCTION g(x int) RETURNS int LANGUAGE sql`,
		`CREATE RULE r AS ON INSERT TO t DO ALSO (NOTIFY a; NOTIFY b)`,
		`SELECT $1::int, a$b FROM t`,
	}
	if !reflect.DeepEqual(firsts, want) {
		t.Fatalf("got %d statements:\n%q\nwant\n%q", len(firsts), firsts, want)
	}
	if wantLines := []int{2, 4, 5, 10, 15, 17}; !reflect.DeepEqual(lines, wantLines) {
		t.Fatalf("lines %v, want %v", lines, wantLines)
	}
	if stmts[5].Num != 6 {
		t.Fatalf("numbering: %d", stmts[5].Num)
	}
}

func TestSplitUnterminated(t *testing.T) {
	for _, src := range []string{"SELECT 'abc", `SELECT "abc`, "SELECT $$ abc", "SELECT 1 /* abc"} {
		if _, err := Split(src); !errors.Is(err, ErrUnterminated) {
			t.Errorf("%q: err %v, want ErrUnterminated", src, err)
		}
	}
}

func TestNonTransactional(t *testing.T) {
	cases := map[string]bool{
		"CREATE INDEX CONCURRENTLY i ON t (a)":                     true,
		"create unique index concurrently if not exists i on t(a)": true,
		"DROP INDEX CONCURRENTLY IF EXISTS i":                      true,
		"REINDEX (VERBOSE) INDEX CONCURRENTLY i":                   true,
		"REINDEX TABLE t":                                          false,
		"VACUUM (ANALYZE) t":                                       true,
		"CREATE DATABASE x":                                        true,
		"ALTER SYSTEM SET work_mem = '8MB'":                        true,
		"ALTER TABLE p DETACH PARTITION c CONCURRENTLY":            true,
		"ALTER TYPE mood ADD VALUE 'meh'":                          true,
		"CREATE INDEX i ON t (a)":                                  false,
		"ALTER TABLE t ADD COLUMN c int":                           false,
		"/* c */ CREATE INDEX CONCURRENTLY i ON t (a)":             true,
	}
	for sql, want := range cases {
		stmts, err := Split(sql)
		if err != nil || len(stmts) != 1 {
			t.Fatalf("%q: %v %d", sql, err, len(stmts))
		}
		if got := stmts[0].NonTransactional(); got != want {
			t.Errorf("%q: NonTransactional=%v, want %v", sql, got, want)
		}
	}
}

func TestConcurrentIndexName(t *testing.T) {
	cases := []struct{ sql, name, table string }{
		{`CREATE INDEX CONCURRENTLY Foo ON public.t (a)`, "foo", "public.t"},
		{`CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS "Foo" ON ONLY "S"."T" USING btree (a)`, "Foo", `"S"."T"`},
		{`CREATE INDEX CONCURRENTLY ON t (a)`, "", "t"},
	}
	for _, c := range cases {
		stmts, _ := Split(c.sql)
		name, table, ok := stmts[0].concurrentIndex()
		if !ok || name != c.name || table != c.table {
			t.Errorf("%q: got %q %q %v", c.sql, name, table, ok)
		}
	}
}

func TestPlanGroupsBlocks(t *testing.T) {
	stmts, _ := Split(`ALTER TABLE t ADD c int; BEGIN; UPDATE t SET c = 1; UPDATE t SET c = 2; COMMIT; CREATE INDEX CONCURRENTLY i ON t(c);`)
	groups, err := Plan(stmts)
	if err != nil {
		t.Fatal(err)
	}
	if len(groups) != 3 || len(groups[1].Stmts) != 2 || groups[1].Begin == nil || !groups[2].NonTx() || groups[0].NonTx() {
		t.Fatalf("groups: %+v", groups)
	}
	for _, bad := range []string{
		"BEGIN; CREATE INDEX CONCURRENTLY i ON t(c); COMMIT;",
		"BEGIN; SELECT 1;",
		"COMMIT;",
		"BEGIN; SELECT 1; ROLLBACK;",
		"SAVEPOINT a;",
	} {
		stmts, _ := Split(bad)
		if _, err := Plan(stmts); !errors.Is(err, ErrTxControl) && !errors.Is(err, ErrNonTxInBlock) {
			t.Errorf("%q: err %v, want a refusal", bad, err)
		}
	}
}

func TestDropColumns(t *testing.T) {
	stmts, _ := Split(`ALTER TABLE IF EXISTS ONLY public."Orders" DROP COLUMN IF EXISTS customer_name, DROP CONSTRAINT c1, ADD COLUMN x int, DROP legacy;
ALTER TABLE orders ALTER COLUMN a DROP NOT NULL;
ALTER TABLE orders DROP CONSTRAINT x;`)
	drops := DropColumns(stmts)
	var got []string
	for _, d := range drops {
		got = append(got, d.Table+"|"+d.TableName+"|"+d.Column)
	}
	want := []string{`public."Orders"|Orders|customer_name`, `public."Orders"|Orders|legacy`}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %q, want %q", got, want)
	}
}
