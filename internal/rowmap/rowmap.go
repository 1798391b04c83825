// Package rowmap describes how a row of one table becomes a row of another —
// target column = SQL expression over the source row — and renders the SQL
// fragments that the copy, the sync triggers and the verifier share, so that
// all three apply exactly the same mapping.
package rowmap

import (
	"fmt"
	"strings"

	"github.com/shadowctl/shadowctl/internal/pgsql"
)

// Column gives one target column's value as SQL over the source row.
type Column struct {
	Target     string `json:"target"`
	TargetType string `json:"target_type"`
	// Expr is SQL evaluated with the source row in scope under Mapping.Alias.
	Expr string `json:"expr"`
	// Source is the source column when Expr only reads that one column
	// (possibly with a cast); "" for any other expression.
	Source string `json:"source,omitempty"`
}

// Mapping turns rows of Source into rows of Target.
type Mapping struct {
	Source pgsql.QualifiedName `json:"source"`
	Target pgsql.QualifiedName `json:"target"`
	// Alias names the source row in expressions (the table's own name, so that
	// operators can write either `amount` or `orders.amount`).
	Alias   string   `json:"alias"`
	Columns []Column `json:"columns"`
	// SourceKey identifies a row on the source side; SourceKeyTypes are their types.
	SourceKey      []string `json:"source_key"`
	SourceKeyTypes []string `json:"source_key_types"`
	// Match gives, for each column of the row identity on the target side, its
	// value from the source row (the source key carried over).
	Match []Column `json:"match"`
	// ConflictKey is the target's unique key used for upserts.
	ConflictKey []string `json:"conflict_key"`
	// OverridingSystemValue is set when a mapped target column is GENERATED
	// ALWAYS AS IDENTITY: the row's own value must be written, not a new one.
	OverridingSystemValue bool `json:"overriding_system_value,omitempty"`
}

// TargetColumnList is "(c1, c2, ...)" of the mapped target columns.
func (m Mapping) TargetColumnList() string {
	parts := make([]string, len(m.Columns))
	for i, c := range m.Columns {
		parts[i] = pgsql.Ident(c.Target)
	}
	return "(" + strings.Join(parts, ", ") + ")"
}

// SelectList is the list of mapped expressions, in TargetColumnList's order.
func (m Mapping) SelectList() string {
	parts := make([]string, len(m.Columns))
	for i, c := range m.Columns {
		parts[i] = c.Expr
	}
	return strings.Join(parts, ", ")
}

// InsertSelect renders INSERT INTO target (...) SELECT <mapping> FROM <from> AS alias.
func (m Mapping) InsertSelect(from string) string {
	overriding := ""
	if m.OverridingSystemValue {
		overriding = " OVERRIDING SYSTEM VALUE"
	}
	return fmt.Sprintf("INSERT INTO %s %s%s SELECT %s FROM %s AS %s",
		m.Target.Quoted(), m.TargetColumnList(), overriding, m.SelectList(), from, pgsql.Ident(m.Alias))
}

// InsertValues renders an INSERT of one row: values[i] goes into Columns[i].
func (m Mapping) InsertValues(values []string) string {
	overriding := ""
	if m.OverridingSystemValue {
		overriding = " OVERRIDING SYSTEM VALUE"
	}
	return fmt.Sprintf("INSERT INTO %s %s%s VALUES (%s)", m.Target.Quoted(), m.TargetColumnList(), overriding, strings.Join(values, ", "))
}

// OnConflictDoNothing renders the copy's conflict clause: a row already in the
// target (written by the sync) is newer and wins.
func (m Mapping) OnConflictDoNothing() string {
	return "ON CONFLICT " + identList(m.ConflictKey) + " DO NOTHING"
}

// OnConflictUpdate renders the sync's upsert clause: the source row wins.
func (m Mapping) OnConflictUpdate() string {
	var sets []string
	for _, c := range m.Columns {
		if contains(m.ConflictKey, c.Target) {
			continue
		}
		sets = append(sets, fmt.Sprintf("%s = EXCLUDED.%s", pgsql.Ident(c.Target), pgsql.Ident(c.Target)))
	}
	if len(sets) == 0 {
		return m.OnConflictDoNothing()
	}
	return "ON CONFLICT " + identList(m.ConflictKey) + " DO UPDATE SET " + strings.Join(sets, ", ")
}

// MatchCondition renders "t.k1 = (expr1) AND ..." finding the target row of a
// source row whose fields are in scope under the mapping's alias.
func (m Mapping) MatchCondition(targetAlias string) string {
	parts := make([]string, len(m.Match))
	for i, c := range m.Match {
		parts[i] = fmt.Sprintf("%s.%s = (%s)", pgsql.Ident(targetAlias), pgsql.Ident(c.Target), c.Expr)
	}
	return strings.Join(parts, " AND ")
}

// MatchColumns are the target columns that carry the source key.
func (m Mapping) MatchColumns() []string {
	out := make([]string, len(m.Match))
	for i, c := range m.Match {
		out[i] = c.Target
	}
	return out
}

// SourceKeyList is "(k1, k2)" over the source key, qualified by alias when given.
func (m Mapping) SourceKeyList(alias string) string { return qualifiedList(alias, m.SourceKey) }

// RowDigestSource renders the mapped row as a record of the target's types,
// for checksums of the source side.
func (m Mapping) RowDigestSource() string {
	parts := make([]string, len(m.Columns))
	for i, c := range m.Columns {
		parts[i] = fmt.Sprintf("CAST((%s) AS %s)", c.Expr, c.TargetType)
	}
	return "ROW(" + strings.Join(parts, ", ") + ")"
}

// RowDigestTarget renders a target row's mapped columns as a record.
func (m Mapping) RowDigestTarget(alias string) string {
	parts := make([]string, len(m.Columns))
	for i, c := range m.Columns {
		parts[i] = pgsql.Ident(alias) + "." + pgsql.Ident(c.Target)
	}
	return "ROW(" + strings.Join(parts, ", ") + ")"
}

func identList(cols []string) string { return qualifiedList("", cols) }

func qualifiedList(alias string, cols []string) string {
	parts := make([]string, len(cols))
	for i, c := range cols {
		if alias != "" {
			parts[i] = pgsql.Ident(alias) + "." + pgsql.Ident(c)
		} else {
			parts[i] = pgsql.Ident(c)
		}
	}
	return "(" + strings.Join(parts, ", ") + ")"
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// KeyBuckets cut the source's first key column (an integer) into about
// KeyBucketCount equal buckets, each guarded by a transaction-level advisory
// lock: a copy batch holds the locks of the buckets its keys fall in, and
// the sync trigger takes a shared lock on a row's bucket before it deletes
// that row from the target (DELETE, or an UPDATE that changes the key). So a
// row that a batch read cannot be deleted from the target before the batch
// has written it, as a row lock on every copied row would ensure, at the
// cost of a few locks per batch instead of a WAL record and a dirtied page
// per row.
type KeyBuckets struct {
	// Class is the first half of the locks' two-integer advisory key.
	Class  int32  `json:"class"`
	Column string `json:"column"`
	Min    int64  `json:"min"`
	Width  int64  `json:"width"`
}

// KeyBucketCount is how many buckets span the key's range when the copy
// starts: a transaction that deletes the whole table takes at most this many
// locks (plus one below the minimum and those past the maximum).
const KeyBucketCount = 256

// NewKeyBuckets spans [min, max] with KeyBucketCount buckets.
func NewKeyBuckets(class int32, column string, min, max int64) *KeyBuckets {
	span := float64(max) - float64(min) + 1
	width := int64(span/KeyBucketCount) + 1
	return &KeyBuckets{Class: class, Column: column, Min: min, Width: width}
}

// Bucket renders the bucket of an integer value as an int4: -1 below Min,
// clamped at the int4 maximum above (numeric: no overflow at any key).
func (k KeyBuckets) Bucket(value string) string {
	return fmt.Sprintf("LEAST(GREATEST(floor(((%s)::numeric - %d) / %d), -1), 2147483647)::int4", value, k.Min, k.Width)
}
