// Package sync keeps a target table current with every change made to a
// source table while a migration runs: blue→green before the cutover,
// green→blue after it. This file holds the trigger implementation: row
// triggers whose functions apply the shared row mapping (internal/rowmap)
// inside the application's own transaction, so both sides always agree at
// every snapshot (see Trigger for how the work is split between them). It
// owns the sync objects' DDL and nothing else.
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
//
// It is two functions behind four row triggers, so that each of the
// application's writes runs as little as possible:
//
//   - the upsert function, for an INSERT and for an UPDATE that keeps the
//     row's key (the triggers named Name+"_ins" and Name+"_upd"): one
//     upsert, nothing else;
//   - the full function, for a DELETE and for an UPDATE that moves the row
//     to another key (Name and Name+"_rekey"): wait for the copy's bucket,
//     delete the old target row, insert the new one.
//
// Which UPDATE goes where is the triggers' WHEN condition, evaluated by
// the server before any function is called, and bound to its operators
// when the trigger is created: it reads nothing through the application
// session's search_path.
//
// Both functions run as their owner (SECURITY DEFINER), since the
// application's roles need no rights on green. A SECURITY DEFINER function
// that resolves any name through its caller's search_path lets the caller
// run code as the owner (an operator "=" of its own ahead of pg_catalog),
// so the full function fixes its search_path. Fixing it is not free: the
// server sets and restores the setting on every call, and the next
// statement of the application's looks its schemas up again. Paired pgbench
// rounds on the bench's workload put it at about 2.5 % of the application's
// throughput. So when the upsert resolves no name at all (every green
// column is a blue column as it is: no operator SQL, no cast, only
// assignment casts, which are found by type), the upsert function has no
// fixed search_path; otherwise it fixes the same one.
type Trigger struct {
	Mapping rowmap.Mapping
	// Func names the full function, and the upsert function with
	// "_upsert" added; Name names the DELETE trigger, and the others with
	// "_ins", "_upd" and "_rekey" added.
	Func pgsql.QualifiedName
	Name string
	// TruncateFunc and TruncateName name the statement trigger that reacts to
	// TRUNCATE of the source (empty: none). OnTruncate is the SQL it runs.
	TruncateFunc pgsql.QualifiedName
	TruncateName string
	OnTruncate   string
	// SearchPath is the search_path the functions fix ("" is pg_catalog's):
	// the full function always, the upsert when the mapping has operator SQL.
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

// upsertFunc names the upsert function (see Trigger).
func (t Trigger) upsertFunc() pgsql.QualifiedName {
	return pgsql.QualifiedName{Schema: t.Func.Schema, Name: t.Func.Name + "_upsert"}
}

func (t Trigger) triggerNames() (del, rekey, ins, upd string) {
	return t.Name, t.Name + "_rekey", t.Name + "_ins", t.Name + "_upd"
}

// searchPathClause is the function's fixed search_path.
func (t Trigger) searchPathClause() string {
	sp := "pg_catalog, pg_temp"
	if t.SearchPath != "" {
		sp = t.SearchPath + ", pg_temp"
	}
	return " SET search_path = " + sp
}

// upsertResolvesNoNames reports whether every mapped column is the source
// column itself: the upsert is then VALUES of NEW's columns into the
// (qualified) target, and names nothing the session's search_path could
// change.
func (t Trigger) upsertResolvesNoNames() bool {
	m := t.Mapping
	for _, c := range slices.Concat(m.Columns, m.Match) {
		if c.Source == "" || c.Expr != pgsql.Ident(m.Alias)+"."+pgsql.Ident(c.Source) {
			return false
		}
	}
	return len(m.Columns) > 0
}

// FunctionsSQL returns the statements that create (or replace) the sync's
// trigger functions. They lock no table, so a swap runs them before it
// takes its lock: validating a function body cost 2 ms of the hold.
func (t Trigger) FunctionsSQL() []string {
	m := t.Mapping
	alias := pgsql.Ident(m.Alias)
	upsert := m.InsertSelect(t.newRow()) + " " + m.OnConflictUpdate()
	var b strings.Builder
	// The full function: a DELETE, or an UPDATE that moves the row to
	// another key (the triggers' WHEN conditions send only those here).
	fmt.Fprintf(&b, "CREATE OR REPLACE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER%s AS $shadowctl$\nBEGIN\n", t.Func.Quoted(), t.searchPathClause())
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
	// The upsert function. When it resolves no name, it writes NEW's
	// columns as VALUES: in paired pgbench rounds that form cost the
	// application 2.3 % (± 1.6) less than selecting them from a subquery,
	// and as little as the issue's plain trigger (BENCHMARKS.md, "The
	// split sync").
	fixed, common := t.searchPathClause(), upsert
	if t.upsertResolvesNoNames() {
		values := make([]string, len(m.Columns))
		for i, c := range m.Columns {
			values[i] = "NEW." + pgsql.Ident(c.Source)
		}
		fixed, common = "", m.InsertValues(values)+" "+m.OnConflictUpdate()
	}
	stmts := []string{b.String(), fmt.Sprintf("CREATE OR REPLACE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER%s AS $shadowctl$\nBEGIN\n  %s;\n  RETURN NULL;\nEND\n$shadowctl$",
		t.upsertFunc().Quoted(), fixed, common)}
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
	src := m.Source.Quoted()
	del, rekey, ins, upd := t.triggerNames()
	stmts := t.DropTriggersSQL()
	row := func(name, event, when string, fn pgsql.QualifiedName) string {
		if when != "" {
			when = " WHEN (" + when + ")"
		}
		return fmt.Sprintf("CREATE TRIGGER %s AFTER %s ON %s FOR EACH ROW%s EXECUTE FUNCTION %s()", pgsql.Ident(name), event, src, when, fn.Quoted())
	}
	stmts = append(stmts,
		row(del, "DELETE", "", t.Func),
		row(ins, "INSERT", "", t.upsertFunc()))
	if c := t.rekeyCondition(); c == "true" {
		stmts = append(stmts, row(rekey, "UPDATE", "", t.Func))
	} else {
		stmts = append(stmts, row(rekey, "UPDATE", c, t.Func), row(upd, "UPDATE", "NOT ("+c+")", t.upsertFunc()))
	}
	if t.TruncateName != "" {
		stmts = append(stmts,
			fmt.Sprintf("CREATE TRIGGER %s AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION %s()",
				pgsql.Ident(t.TruncateName), src, t.TruncateFunc.Quoted()))
	}
	return stmts
}

// DropSQL returns the statements that remove the sync; each is a no-op when
// the object is gone already, so an interrupted removal can be repeated.
func (t Trigger) DropSQL() []string {
	return append(t.DropTriggersSQL(), t.DropFunctionsSQL()...)
}

// DropFunctionsSQL removes only the functions (after the triggers are gone);
// it takes no lock on any table.
func (t Trigger) DropFunctionsSQL() []string {
	stmts := []string{fmt.Sprintf("DROP FUNCTION IF EXISTS %s()", t.upsertFunc().Quoted()), fmt.Sprintf("DROP FUNCTION IF EXISTS %s()", t.Func.Quoted())}
	if t.TruncateName != "" {
		stmts = append(stmts, fmt.Sprintf("DROP FUNCTION IF EXISTS %s()", t.TruncateFunc.Quoted()))
	}
	return stmts
}

// DropTriggersSQL removes only the triggers (the swap re-points the source,
// the functions stay for a later reinstall). Name alone was the whole sync's
// one trigger before the upsert had its own: dropping it covers a sync
// created by an earlier version too.
func (t Trigger) DropTriggersSQL() []string {
	del, rekey, ins, upd := t.triggerNames()
	var stmts []string
	for _, n := range []string{t.TruncateName, ins, upd, rekey, del} {
		if n != "" {
			stmts = append(stmts, fmt.Sprintf("DROP TRIGGER IF EXISTS %s ON %s", pgsql.Ident(n), t.Mapping.Source.Quoted()))
		}
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
