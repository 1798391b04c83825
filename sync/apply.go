package sync

// This file: how the logical applier turns decoded row changes into few
// statements, through the same mapping expressions as the copy and the
// triggers. Changes are collected into groups; a group goes to green as at
// most two multi-row statements over unnest() of text arrays (one array per
// blue column, values as pgoutput sent them): first a DELETE of the keys it
// deletes, then an upsert of the rows it writes, in stream order (a
// function scan returns them in array order).
//
// Why that equals applying the changes one by one in stream order: while
// the logical sync runs (before the first cutover) green has no user
// triggers and no foreign keys pointing at it, so a delete only removes its
// row and frees its unique values; doing it earlier never makes a later
// write fail or differ. Per key, a group holds at most one delete and one
// upsert, and keeps the order that matters:
//   - delete then upsert (a re-insert): the delete runs first, as it should;
//   - upsert then delete: the upsert is dropped, the delete remains;
//   - a second upsert of a key: ON CONFLICT DO UPDATE cannot touch a row
//     twice. When green has no unique index but its key, the second upsert
//     replaces the first in place (its unchanged TOASTed values taken from
//     the first); otherwise moving a row's values earlier or later could
//     break unique values swapped between rows, so the group ends;
//   - a second delete (without a re-insert between): the group ends.
// Upserts keep their relative order, so unique values moved between rows
// stay valid.

import (
	"context"
	"encoding/binary"
	"fmt"
	"strings"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/shadowctl/shadowctl/internal/pgmeta"
	"github.com/shadowctl/shadowctl/internal/pgsql"
)

// Kinds of statements.
const (
	opUpsert byte = 'u'
	opDelete byte = 'd'
	// opMove is a key change whose new row has unchanged TOASTed values:
	// green's old row is deleted and its values carried to the new key in
	// one statement (a lookup after a separate delete would find nothing).
	opMove byte = 'm'
)

// queued is one statement for the green transaction.
type queued struct {
	sql  string
	args []any
}

// rows are the rows of one statement: per blue column, a value per row.
type rows struct {
	n    int
	vals [][]pgtype.Text
	// unchanged, per blue column, flags unchanged TOASTed values (nil: none).
	unchanged [][]bool
	// dropped flags rows left out (an upsert followed by a delete); nil: none.
	dropped []bool
}

// group collects changes, at most one delete and one upsert per key.
type group struct {
	dels, ups rows
	// move, when set, is the group's only change (see opMove).
	move *rows
	old  []pgtype.Text // the move's old key, per key column
	keys map[string]keyState
}

// keyState is what a group does to one key.
type keyState struct {
	deleted bool
	up      int // 1 + the key's row in ups; 0: none
}

// batcher collects the statements of the open green transaction.
type batcher struct {
	a     *Applier
	g     *group
	stmts []queued
	rows  int // changes added since the last take
	bytes int // and the bytes of their values
	key   []byte
}

// add queues one decoded change.
func (b *batcher) add(m pglogrepl.Message) error {
	a := b.a
	switch m := m.(type) {
	case *pglogrepl.InsertMessage:
		return b.row(opUpsert, m.Tuple, nil)
	case *pglogrepl.UpdateMessage:
		if m.OldTuple == nil || (a.sameKeySameRow && b.sameKey(m.OldTuple, m.NewTuple)) {
			return b.row(opUpsert, m.NewTuple, nil)
		}
		// The key changed (or, with REPLICA IDENTITY FULL, may have).
		if hasUnchanged(m.NewTuple) {
			return b.row(opMove, m.NewTuple, m.OldTuple)
		}
		if err := b.row(opDelete, m.OldTuple, nil); err != nil {
			return err
		}
		return b.row(opUpsert, m.NewTuple, nil)
	case *pglogrepl.DeleteMessage:
		if m.OldTuple == nil {
			return fmt.Errorf("a DELETE on %s came without its key (replica identity NOTHING?)", a.Mapping.Source)
		}
		return b.row(opDelete, m.OldTuple, nil)
	}
	return nil
}

func hasUnchanged(t *pglogrepl.TupleData) bool {
	for _, c := range t.Columns {
		if c.DataType == pglogrepl.TupleDataTypeToast {
			return true
		}
	}
	return false
}

// keyOf renders a tuple's key as bytes (length-prefixed text values), valid
// until the next call.
func (b *batcher) keyOf(t *pglogrepl.TupleData) ([]byte, error) {
	b.key = b.key[:0]
	for _, i := range b.a.keyCols {
		if i >= len(t.Columns) || t.Columns[i].DataType != pglogrepl.TupleDataTypeText {
			return nil, fmt.Errorf("a change on %s came without the value of key column %s", b.a.Mapping.Source, pgsql.Ident(b.a.SourceColumns[i].Name))
		}
		b.key = binary.BigEndian.AppendUint32(b.key, uint32(len(t.Columns[i].Data)))
		b.key = append(b.key, t.Columns[i].Data...)
	}
	return b.key, nil
}

func (b *batcher) sameKey(old, nw *pglogrepl.TupleData) bool {
	k1, err := b.keyOf(old)
	if err != nil {
		return false
	}
	s := string(k1)
	k2, err := b.keyOf(nw)
	return err == nil && s == string(k2)
}

// row adds one change to the open group, first closing the group when the
// change cannot join it.
func (b *batcher) row(kind byte, t, old *pglogrepl.TupleData) error {
	a := b.a
	k, err := b.keyOf(t)
	if err != nil {
		return err
	}
	key := string(k)
	if g := b.g; g != nil {
		st := g.keys[key]
		if g.move != nil || kind == opMove || !a.groupable || g.dels.n+g.ups.n >= maxGroupRows ||
			(kind == opDelete && st.deleted && st.up == 0) ||
			(kind == opUpsert && st.up > 0 && !a.mergeUpserts) {
			b.close()
		}
	}
	if b.g == nil {
		b.g = &group{keys: map[string]keyState{}}
	}
	g := b.g
	st := g.keys[key]
	switch kind {
	case opDelete:
		if st.up > 0 { // upsert then delete: only the delete counts
			g.ups.drop(st.up - 1)
			st.up = 0
		}
		if !st.deleted {
			g.dels.add(a, t, false)
			st.deleted = true
		}
	case opUpsert:
		if st.up > 0 { // see mergeUpserts
			g.ups.replace(st.up-1, t)
			break
		}
		g.ups.add(a, t, true)
		st.up = g.ups.n
	case opMove:
		g.move = &rows{}
		g.move.add(a, t, true)
		for _, i := range a.keyCols {
			g.old = append(g.old, pgtype.Text{String: string(old.Columns[i].Data), Valid: true})
		}
	}
	g.keys[key] = st
	b.rows++
	for _, c := range t.Columns {
		b.bytes += len(c.Data)
	}
	return nil
}

// add appends a tuple's values; unchanged TOASTed values are flagged when
// the statement needs them (not for deletes, which use the key only).
func (r *rows) add(a *Applier, t *pglogrepl.TupleData, flagUnchanged bool) {
	if r.vals == nil {
		r.vals = make([][]pgtype.Text, len(a.SourceColumns))
		r.unchanged = make([][]bool, len(a.SourceColumns))
	}
	for i := range a.SourceColumns {
		v, u := pgtype.Text{}, false
		if i < len(t.Columns) {
			switch c := t.Columns[i]; c.DataType {
			case pglogrepl.TupleDataTypeText:
				v = pgtype.Text{String: string(c.Data), Valid: true}
			case pglogrepl.TupleDataTypeToast:
				u = flagUnchanged
			}
		}
		r.vals[i] = append(r.vals[i], v)
		if u && r.unchanged[i] == nil {
			r.unchanged[i] = make([]bool, r.n, max(r.n+1, 16))
		}
		if r.unchanged[i] != nil {
			r.unchanged[i] = append(r.unchanged[i], u)
		}
	}
	r.n++
}

// replace overwrites row i with a later version of the same row; values
// unchanged in it keep what row i had (a value, or its unchanged flag).
func (r *rows) replace(i int, t *pglogrepl.TupleData) {
	for c := range r.vals {
		v := pgtype.Text{}
		if c < len(t.Columns) {
			switch col := t.Columns[c]; col.DataType {
			case pglogrepl.TupleDataTypeToast:
				continue
			case pglogrepl.TupleDataTypeText:
				v = pgtype.Text{String: string(col.Data), Valid: true}
			}
		}
		r.vals[c][i] = v
		if r.unchanged[c] != nil {
			r.unchanged[c][i] = false
		}
	}
}

// drop leaves row i out of the statement.
func (r *rows) drop(i int) {
	if len(r.dropped) <= i {
		r.dropped = append(r.dropped, make([]bool, r.n-len(r.dropped))...)
	}
	r.dropped[i] = true
}

// compact removes the dropped rows.
func (r *rows) compact() {
	if r.dropped == nil {
		return
	}
	n := 0
	for i := 0; i < r.n; i++ {
		if i < len(r.dropped) && r.dropped[i] {
			continue
		}
		for c := range r.vals {
			r.vals[c][n] = r.vals[c][i]
			if r.unchanged[c] != nil {
				r.unchanged[c][n] = r.unchanged[c][i]
			}
		}
		n++
	}
	for c := range r.vals {
		r.vals[c] = r.vals[c][:n]
		if r.unchanged[c] != nil {
			r.unchanged[c] = r.unchanged[c][:n]
		}
	}
	r.n, r.dropped = n, nil
}

// close turns the open group into statements.
func (b *batcher) close() {
	g := b.g
	if g == nil {
		return
	}
	b.g = nil
	if g.dels.n > 0 {
		b.statement(opDelete, &g.dels, nil)
	}
	if g.ups.compact(); g.ups.n > 0 {
		b.statement(opUpsert, &g.ups, nil)
	}
	if g.move != nil {
		b.statement(opMove, g.move, g.old)
	}
}

// statement queues the statement for rows of one kind.
func (b *batcher) statement(kind byte, r *rows, old []pgtype.Text) {
	a := b.a
	shape := make([]byte, 0, 16)
	shape = append(shape, kind)
	args := make([]any, 0, len(r.vals)+len(old)+2)
	for _, v := range r.vals {
		args = append(args, pgtype.FlatArray[pgtype.Text](v))
	}
	for i, u := range r.unchanged {
		if u != nil {
			shape = append(shape, byte(i>>8), byte(i))
			args = append(args, pgtype.FlatArray[bool](u))
		}
	}
	for _, o := range old {
		args = append(args, pgtype.FlatArray[pgtype.Text]{o})
	}
	a.stmtMu.Lock()
	sql, ok := a.stmts[string(shape)]
	if !ok {
		sql = a.buildStatement(kind, r.unchanged)
		if a.stmts == nil {
			a.stmts = map[string]string{}
		}
		a.stmts[string(shape)] = sql
	}
	a.stmtMu.Unlock()
	b.stmts = append(b.stmts, queued{sql: sql, args: args})
}

// take closes the open group and hands over the statements so far.
func (b *batcher) take() []queued {
	b.close()
	stmts := b.stmts
	b.stmts, b.rows, b.bytes = nil, 0, 0
	return stmts
}

// maxGroupRows bounds the rows of one group (a group never spans a hand-off
// to the writer either, see handOffRows).
const maxGroupRows = 4000

// buildStatement renders the SQL of a statement's shape: its kind and which
// columns carry unchanged TOASTed values. Parameters: one text[] per blue
// column, a bool[] per column with unchanged values, then (moves) a text[]
// per key column with the old key.
func (a *Applier) buildStatement(kind byte, unchanged [][]bool) string {
	m := a.Mapping
	src := pgsql.Ident("shadowctl_src")
	var arrays, names []string
	for i := range a.SourceColumns {
		arrays = append(arrays, fmt.Sprintf("$%d::text[]", len(arrays)+1))
		names = append(names, fmt.Sprintf("c%d", i))
	}
	for i, u := range unchanged {
		if u != nil {
			arrays = append(arrays, fmt.Sprintf("$%d::bool[]", len(arrays)+1))
			names = append(names, fmt.Sprintf("u%d", i))
		}
	}
	oldParam := len(arrays) + 1
	from := fmt.Sprintf("unnest(%s) AS %s(%s)", strings.Join(arrays, ", "), src, strings.Join(names, ", "))
	// keyAt finds a row by the key in the given columns of the source row.
	keyAt := func(alias string, col func(j int) string) string {
		var conds []string
		for j, k := range m.SourceKey {
			conds = append(conds, fmt.Sprintf("%s.%s = %s::%s", alias, pgsql.Ident(k), col(j), m.SourceKeyTypes[j]))
		}
		return strings.Join(conds, " AND ")
	}
	newKey := func(j int) string { return fmt.Sprintf("%s.c%d", src, a.keyCols[j]) }
	var cols []string
	for i, c := range a.SourceColumns {
		v := fmt.Sprintf("%s.c%d::%s", src, i, c.Type)
		if kind != opDelete && unchanged[i] != nil {
			// The value did not change, so it is not in the stream: green's
			// copy of it (at the old key for a move), else blue's current value.
			var alts []string
			if gc := a.carriedBy(c.Name); gc != "" {
				if kind == opMove {
					alts = append(alts, fmt.Sprintf("(SELECT o.%s FROM shadowctl_old AS o)::%s", pgsql.Ident(gc), c.Type))
				}
				alts = append(alts, fmt.Sprintf("(SELECT g.%s FROM ONLY %s AS g WHERE %s)::%s", pgsql.Ident(gc), m.Target.Quoted(), keyAt("g", newKey), c.Type))
			}
			alts = append(alts, fmt.Sprintf("(SELECT b.%s FROM ONLY %s AS b WHERE %s)", pgsql.Ident(c.Name), m.Source.Quoted(), keyAt("b", newKey)))
			u := fmt.Sprintf("coalesce(%s)", strings.Join(alts, ", "))
			if kind == opMove { // one row, and this value is unchanged
				v = u
			} else {
				v = fmt.Sprintf("CASE WHEN %s.u%d THEN %s ELSE %s END", src, i, u, v)
			}
		}
		cols = append(cols, v+" AS "+pgsql.Ident(c.Name))
	}
	row := fmt.Sprintf("(SELECT %s FROM %s)", strings.Join(cols, ", "), from)
	switch kind {
	case opDelete:
		return fmt.Sprintf("DELETE FROM ONLY %s AS t USING %s AS %s WHERE %s", m.Target.Quoted(), row, pgsql.Ident(m.Alias), m.MatchCondition("t"))
	case opMove:
		var oldCols, oldArrays, oldNames []string
		for j, k := range m.SourceKey {
			oldArrays = append(oldArrays, fmt.Sprintf("$%d::text[]", oldParam+j))
			oldNames = append(oldNames, fmt.Sprintf("k%d", j))
			oldCols = append(oldCols, fmt.Sprintf("%s.k%d::%s AS %s", src, j, m.SourceKeyTypes[j], pgsql.Ident(k)))
		}
		oldRow := fmt.Sprintf("(SELECT %s FROM unnest(%s) AS %s(%s))", strings.Join(oldCols, ", "), strings.Join(oldArrays, ", "), src, strings.Join(oldNames, ", "))
		// The old row is deleted by the CTE, which the new row's values read
		// first: the insert then sees it gone (also for unique values the
		// row keeps).
		return fmt.Sprintf("WITH shadowctl_old AS (DELETE FROM ONLY %s AS t USING %s AS %s WHERE %s RETURNING t.*) %s %s",
			m.Target.Quoted(), oldRow, pgsql.Ident(m.Alias), m.MatchCondition("t"), m.InsertSelect(row), m.OnConflictUpdate())
	default:
		return m.InsertSelect(row) + " " + m.OnConflictUpdate()
	}
}

// carriedBy names the green column that holds blue column name as it is, or "".
func (a *Applier) carriedBy(name string) string {
	for _, gc := range a.Mapping.Columns {
		if gc.Source == name {
			return gc.Target
		}
	}
	return ""
}

// Key types whose text form is canonical (equal values have equal text, so
// rows with different key text never meet at the same green row): bool,
// bytea, "char", name, the integers, text, oid, varchar, date, timestamp,
// timestamptz (in the WAL sender's fixed time zone), uuid; character(n)
// too, but only with a length (it is then always padded). Others (numeric
// 1.0 = 1.00, floats, citext, domains...) are applied a row at a time.
var canonicalKeyTypes = map[uint32]bool{
	16: true, 17: true, 18: true, 19: true, 20: true, 21: true, 23: true, 25: true, 26: true,
	1043: true, 1082: true, 1114: true, 1184: true, 2950: true,
}

const bpcharOID = 1042

// planGrouping decides, once per run, how changes may be grouped.
func (a *Applier) planGrouping(ctx context.Context) error {
	m := a.Mapping
	// Green's indexes are all built before the stream is applied (the copy
	// builds them); one unique index is the key's.
	var unique int
	if err := a.Pool.QueryRow(ctx, `SELECT count(*) FROM pg_index WHERE indrelid = $1::regclass AND indisunique`, m.Target.Quoted()).Scan(&unique); err != nil {
		return fmt.Errorf("read the unique indexes of %s: %w", m.Target, err)
	}
	a.keyCols = a.keyCols[:0]
	a.groupable = sameSet(m.ConflictKey, m.MatchColumns())
	for _, k := range m.SourceKey {
		i := columnIndex(a.SourceColumns, k)
		if i < 0 {
			return fmt.Errorf("key column %s is not a column of %s", pgsql.Ident(k), m.Source)
		}
		a.keyCols = append(a.keyCols, i)
		c := a.SourceColumns[i]
		canonical := canonicalKeyTypes[c.TypeOID] || (c.TypeOID == bpcharOID && c.TypeMod >= 0)
		if !canonical || c.Collation != "" { // an explicit collation may be nondeterministic
			a.groupable = false
		}
	}
	a.mergeUpserts = a.groupable && unique <= 1
	// Like the trigger's re-key condition: an update whose key text did not
	// change stays at its green row when green's key is blue's key carried
	// over.
	a.sameKeySameRow = sameSet(m.ConflictKey, m.MatchColumns())
	for _, c := range m.Match {
		if c.Source == "" {
			a.sameKeySameRow = false
		}
	}
	return nil
}

func columnIndex(cols []pgmeta.Column, name string) int {
	for i, c := range cols {
		if c.Name == name {
			return i
		}
	}
	return -1
}
