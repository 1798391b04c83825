// Package sync keeps a target table current with every change made to a
// source table while a migration runs: blue→green before the cutover,
// green→blue after it. This file holds the trigger implementation: row
// triggers whose function applies the shared row mapping (internal/rowmap)
// inside the application's own transaction, so both sides always agree at
// every snapshot. It owns the sync objects' DDL and nothing else.
package sync

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/shadowctl/shadowctl/internal/pgsql"
	"github.com/shadowctl/shadowctl/internal/rowmap"
)

// Trigger is a trigger sync from Mapping.Source to Mapping.Target.
type Trigger struct {
	Mapping rowmap.Mapping
	// Func and Name name the row trigger's function and the trigger.
	Func pgsql.QualifiedName
	Name string
	// TruncateFunc and TruncateName name the statement trigger that reacts to
	// TRUNCATE of the source (empty: none). OnTruncate is the SQL it runs.
	TruncateFunc pgsql.QualifiedName
	TruncateName string
	OnTruncate   string
	// SearchPath is fixed on the function when the mapping has operator SQL.
	SearchPath string
	// Guard, when set, makes a DELETE or a key change wait for the copy
	// batch holding the row's key bucket.
	Guard *rowmap.KeyBuckets
}

// CreateSQL returns the statements that create the sync: FunctionsSQL, then
// TriggersSQL. Creating the triggers takes SHARE ROW EXCLUSIVE on the
// source: run them under a short lock_timeout.
func (t Trigger) CreateSQL() []string {
	return append(t.FunctionsSQL(), t.TriggersSQL()...)
}

// FunctionsSQL returns the statements that create (or replace) the sync's
// trigger functions. They lock no table, so a swap runs them before it
// takes its lock: validating a function body cost 2 ms of the hold.
func (t Trigger) FunctionsSQL() []string {
	m := t.Mapping
	alias := pgsql.Ident(m.Alias)
	var b strings.Builder
	fmt.Fprintf(&b, "CREATE OR REPLACE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER", t.Func.Quoted())
	sp := "pg_catalog, pg_temp"
	if t.SearchPath != "" {
		sp = t.SearchPath + ", pg_temp"
	}
	fmt.Fprintf(&b, " SET search_path = %s AS $shadowctl$\nBEGIN\n", sp)
	// The common case first, and alone: an INSERT, or an UPDATE that keeps
	// the row's key, is one upsert. Every test on this path is paid by each
	// of the application's writes.
	upsert := m.InsertSelect(t.newRow()) + " " + m.OnConflictUpdate()
	fmt.Fprintf(&b, "  IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND NOT (%s)) THEN\n", t.rekeyCondition())
	fmt.Fprintf(&b, "    %s;\n    RETURN NULL;\n  END IF;\n", upsert)
	// A DELETE, or an UPDATE that moves the row to another key: delete the
	// old target row, then (UPDATE) insert the new one.
	if g := t.Guard; g != nil {
		// Wait for a copy batch that may be writing this row (see
		// rowmap.KeyBuckets) before deleting it from the target; only when
		// the row leaves its source key (a re-key of the target alone,
		// keeping the source key, leaves the copy's batch to itself).
		fmt.Fprintf(&b, "  IF TG_OP = 'DELETE' OR %s THEN\n", keyChanged(m.SourceKey))
		fmt.Fprintf(&b, "    PERFORM pg_advisory_xact_lock_shared(%d, %s);\n  END IF;\n", g.Class, g.Bucket("OLD."+pgsql.Ident(g.Column)))
	}
	fmt.Fprintf(&b, "  DELETE FROM %s AS t USING (SELECT OLD.*) AS %s WHERE %s;\n", m.Target.Quoted(), alias, m.MatchCondition("t"))
	fmt.Fprintf(&b, "  IF TG_OP = 'UPDATE' THEN\n    %s;\n  END IF;\n", upsert)
	b.WriteString("  RETURN NULL;\nEND\n$shadowctl$")
	stmts := []string{b.String()}
	if t.TruncateName != "" {
		stmts = append(stmts,
			fmt.Sprintf("CREATE OR REPLACE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $shadowctl$\nBEGIN\n%s;\nRETURN NULL;\nEND\n$shadowctl$",
				t.TruncateFunc.Quoted(), t.OnTruncate))
	}
	return stmts
}

// TriggersSQL returns the statements that attach the functions to the
// source (again, if they are there already).
func (t Trigger) TriggersSQL() []string {
	m := t.Mapping
	stmts := []string{
		fmt.Sprintf("DROP TRIGGER IF EXISTS %s ON %s", pgsql.Ident(t.Name), m.Source.Quoted()),
		fmt.Sprintf("CREATE TRIGGER %s AFTER INSERT OR UPDATE OR DELETE ON %s FOR EACH ROW EXECUTE FUNCTION %s()",
			pgsql.Ident(t.Name), m.Source.Quoted(), t.Func.Quoted()),
	}
	if t.TruncateName != "" {
		stmts = append(stmts,
			fmt.Sprintf("DROP TRIGGER IF EXISTS %s ON %s", pgsql.Ident(t.TruncateName), m.Source.Quoted()),
			fmt.Sprintf("CREATE TRIGGER %s AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION %s()",
				pgsql.Ident(t.TruncateName), m.Source.Quoted(), t.TruncateFunc.Quoted()))
	}
	return stmts
}

// DropSQL returns the statements that remove the sync; each is a no-op when
// the object is gone already, so an interrupted removal can be repeated.
func (t Trigger) DropSQL() []string {
	m := t.Mapping
	stmts := []string{}
	if t.TruncateName != "" {
		stmts = append(stmts,
			fmt.Sprintf("DROP TRIGGER IF EXISTS %s ON %s", pgsql.Ident(t.TruncateName), m.Source.Quoted()),
			fmt.Sprintf("DROP FUNCTION IF EXISTS %s()", t.TruncateFunc.Quoted()))
	}
	return append(stmts,
		fmt.Sprintf("DROP TRIGGER IF EXISTS %s ON %s", pgsql.Ident(t.Name), m.Source.Quoted()),
		fmt.Sprintf("DROP FUNCTION IF EXISTS %s()", t.Func.Quoted()))
}

// DropFunctionsSQL removes only the functions (after the triggers are gone);
// it takes no lock on any table.
func (t Trigger) DropFunctionsSQL() []string {
	stmts := []string{fmt.Sprintf("DROP FUNCTION IF EXISTS %s()", t.Func.Quoted())}
	if t.TruncateName != "" {
		stmts = append(stmts, fmt.Sprintf("DROP FUNCTION IF EXISTS %s()", t.TruncateFunc.Quoted()))
	}
	return stmts
}

// DropTriggersSQL removes only the triggers (the swap re-points the source,
// the functions stay for a later reinstall).
func (t Trigger) DropTriggersSQL() []string {
	stmts := []string{fmt.Sprintf("DROP TRIGGER IF EXISTS %s ON %s", pgsql.Ident(t.Name), t.Mapping.Source.Quoted())}
	if t.TruncateName != "" {
		stmts = append(stmts, fmt.Sprintf("DROP TRIGGER IF EXISTS %s ON %s", pgsql.Ident(t.TruncateName), t.Mapping.Source.Quoted()))
	}
	return stmts
}

// newRow is the upsert's source row. When every target column is one
// source column (cast or not), NEW's columns one by one, only those: each
// is a scalar parameter of the statement's cached plan, where (SELECT
// NEW.*) passes the whole row as one composite value that every column
// then takes apart again (on the bench's table, 25,000 writes alternated
// with the other form six times: the trigger's cost fell from 27 to 24 µs
// a row, what the plain trigger costs). An operator's expression
// may read any column, or the row itself under the mapping's alias: it
// gets the whole row.
func (t Trigger) newRow() string {
	seen := map[string]bool{}
	var cols []string
	for _, c := range slices.Concat(t.Mapping.Columns, t.Mapping.Match) {
		if c.Source == "" {
			return "(SELECT NEW.*)"
		}
		if !seen[c.Source] {
			seen[c.Source] = true
			cols = append(cols, "NEW."+pgsql.Ident(c.Source)+" AS "+pgsql.Ident(c.Source))
		}
	}
	if len(cols) == 0 {
		return "(SELECT NEW.*)"
	}
	return "(SELECT " + strings.Join(cols, ", ") + ")"
}

// rekeyCondition is true when an UPDATE moves the row to another target key.
// When every match column is a plain source column, comparing those columns
// of OLD and NEW is enough; otherwise always re-key (delete + insert).
func (t Trigger) rekeyCondition() string {
	m := t.Mapping
	var cols []string
	for _, c := range m.Match {
		if c.Source == "" {
			return "true"
		}
		cols = append(cols, c.Source)
	}
	// If the target's conflict key is not the match key, an update of a
	// conflict-key column would leave the old row: always re-key then.
	if !sameSet(m.ConflictKey, m.MatchColumns()) {
		return "true"
	}
	return keyChanged(cols)
}

// keyChanged is true when an UPDATE changes any of the source columns cols.
func keyChanged(cols []string) string {
	old, nw := make([]string, len(cols)), make([]string, len(cols))
	for i, c := range cols {
		old[i], nw[i] = "OLD."+pgsql.Ident(c), "NEW."+pgsql.Ident(c)
	}
	return fmt.Sprintf("ROW(%s) IS DISTINCT FROM ROW(%s)", strings.Join(old, ", "), strings.Join(nw, ", "))
}

func sameSet(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	seen := map[string]bool{}
	for _, x := range a {
		seen[x] = true
	}
	for _, x := range b {
		if !seen[x] {
			return false
		}
	}
	return true
}

// Exec runs statements in order on q. Inside a transaction they go in one
// round trip (pgsql.ExecPipelined): swaps run them under a lock the
// application waits on. Outside one each runs, and commits, by itself.
func Exec(ctx context.Context, q pgsql.Querier, stmts []string) error {
	if tx, ok := q.(pgx.Tx); ok {
		return pgsql.ExecPipelined(ctx, tx, stmts)
	}
	for _, s := range stmts {
		if _, err := q.Exec(ctx, s); err != nil {
			return fmt.Errorf("%s: %w", pgsql.FirstLine(s, 120), err)
		}
	}
	return nil
}
