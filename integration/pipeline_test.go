package integration

import (
	"context"
	"errors"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/shadowctl/shadowctl/internal/pgsql"
)

// The swap sends its statements in one round trip; a failure still names the
// statement that failed, with the server's code, and the statements before
// it do not survive the transaction.
func TestPipelinedStatementsRunInOrderAndNameTheOneThatFailed(t *testing.T) {
	db := newTestDB(t)
	ctx := context.Background()

	err := pgx.BeginFunc(ctx, db.Pool, func(tx pgx.Tx) error {
		return pgsql.ExecPipelined(ctx, tx, []string{
			"CREATE TABLE first (id int)",
			"CREATE VIEW first_view AS SELECT id FROM first", // needs the one before
			"ALTER TABLE first RENAME TO second",
		})
	})
	if err != nil {
		t.Fatalf("pipeline of three good statements: %v", err)
	}
	if got := scalar[string](db, `SELECT string_agg(relname, ',' ORDER BY relname) FROM pg_class WHERE relname IN ('first', 'second', 'first_view')`); got != "first_view,second" {
		t.Fatalf("after the pipeline: relations %q, want first_view,second (in order, all of them)", got)
	}

	err = pgx.BeginFunc(ctx, db.Pool, func(tx pgx.Tx) error {
		return pgsql.ExecPipelined(ctx, tx, []string{
			"CREATE TABLE third (id int)",
			"CREATE TABLE second (id int)\n-- the name is taken",
			"CREATE TABLE fourth (id int)",
		})
	})
	var pe *pgsql.PipelineError
	if !errors.As(err, &pe) {
		t.Fatalf("a failing pipeline returned %v (%T), want a *pgsql.PipelineError", err, err)
	}
	if pe.Index != 1 || pe.SQL != "CREATE TABLE second (id int)" {
		t.Fatalf("failure attributed to statement %d %q, want 1 \"CREATE TABLE second (id int)\"", pe.Index, pe.SQL)
	}
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "42P07" {
		t.Fatalf("error %v does not carry the server's duplicate_table (42P07)", err)
	}
	if n := scalar[int](db, `SELECT count(*)::int FROM pg_class WHERE relname IN ('third', 'fourth')`); n != 0 {
		t.Fatalf("%d of the failed pipeline's tables exist after its rollback, want 0", n)
	}
	// A last statement with arguments rides in the same pipeline; its row
	// count comes back (a swap's catalog record: one row when it moved).
	for _, tc := range []struct {
		arg  []byte
		rows int
	}{{[]byte("yes"), 1}, {[]byte("no"), 0}, {nil, 0}} {
		var rows int
		err := pgx.BeginFunc(ctx, db.Pool, func(tx pgx.Tx) error {
			var err error
			rows, err = pgsql.ExecPipelinedThen(ctx, tx, []string{"CREATE TABLE fifth (id int)"},
				&pgsql.Statement{SQL: `SELECT count(*) FROM fifth WHERE $1 = 'yes'`, Args: [][]byte{tc.arg}})
			if err != nil {
				return err
			}
			_, err = tx.Exec(ctx, "DROP TABLE fifth")
			return err
		})
		if err != nil || rows != 1 {
			t.Fatalf("an aggregate after the DDL with argument %q: %d rows, %v; want 1 row", tc.arg, rows, err)
		}
		err = pgx.BeginFunc(ctx, db.Pool, func(tx pgx.Tx) error {
			var err error
			rows, err = pgsql.ExecPipelinedThen(ctx, tx, nil, &pgsql.Statement{SQL: `SELECT 1 WHERE $1 = 'yes'`, Args: [][]byte{tc.arg}})
			return err
		})
		if err != nil || rows != tc.rows {
			t.Fatalf("argument %q: %d rows, %v; want %d rows", tc.arg, rows, err, tc.rows)
		}
	}

	// The pool's connection is usable again.
	if got := scalar[int](db, `SELECT 1`); got != 1 {
		t.Fatal("the pool does not answer after a failed pipeline")
	}
}
