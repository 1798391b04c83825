package demo

import (
	"context"
	"fmt"
	"regexp"
	"strings"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/shadowctl/shadowctl/internal/pgsql"
)

// describe renders a table's definition the way psql's \d does, from
// pg_catalog (so it needs no psql binary): columns, indexes, constraints and
// owned sequences.
func describe(ctx context.Context, q pgsql.Querier, t pgsql.QualifiedName) (string, error) {
	var b strings.Builder
	var kind string
	if err := q.QueryRow(ctx, `SELECT CASE relkind WHEN 'r' THEN 'Table' WHEN 'v' THEN 'View' ELSE relkind::text END FROM pg_class WHERE oid = to_regclass($1)`,
		t.Quoted()).Scan(&kind); err != nil {
		return "", fmt.Errorf("describe %s: %w", t, err)
	}
	fmt.Fprintf(&b, "%s \"%s.%s\"\n", kind, t.Schema, t.Name)
	rows, err := q.Query(ctx, `SELECT a.attname, format_type(a.atttypid, a.atttypmod), CASE WHEN a.attnotnull THEN 'not null' ELSE '' END,
			coalesce(pg_get_expr(d.adbin, d.adrelid), '')
		  FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
		 WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum`, t.Quoted())
	if err != nil {
		return "", fmt.Errorf("describe %s: %w", t, err)
	}
	cols, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) ([4]string, error) {
		var c [4]string
		err := r.Scan(&c[0], &c[1], &c[2], &c[3])
		return c, err
	})
	if err != nil {
		return "", fmt.Errorf("describe %s: %w", t, err)
	}
	b.WriteString(grid([4]string{"Column", "Type", "Nullable", "Default"}, cols))
	rows, err = q.Query(ctx, `SELECT c.relname, i.indisprimary, i.indisunique, pg_get_indexdef(i.indexrelid)
		  FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
		 WHERE i.indrelid = to_regclass($1) ORDER BY NOT i.indisprimary, c.relname`, t.Quoted())
	if err != nil {
		return "", fmt.Errorf("describe %s: %w", t, err)
	}
	type index struct {
		name            string
		primary, unique bool
		def             string
	}
	idx, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (index, error) {
		var i index
		err := r.Scan(&i.name, &i.primary, &i.unique, &i.def)
		return i, err
	})
	if err != nil {
		return "", fmt.Errorf("describe %s: %w", t, err)
	}
	if len(idx) > 0 {
		b.WriteString("Indexes:\n")
	}
	for _, i := range idx {
		def := i.def
		if m := usingRe.FindStringSubmatch(def); m != nil {
			def = m[1]
		}
		prefix := ""
		if i.primary {
			prefix = "PRIMARY KEY, "
		} else if i.unique {
			prefix = "UNIQUE, "
		}
		fmt.Fprintf(&b, "    %s %s%s\n", pgsql.Ident(i.name), prefix, def)
	}
	for _, sec := range []struct{ title, types string }{{"Check constraints", "c"}, {"Foreign-key constraints", "f"}} {
		rows, err = q.Query(ctx, `SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint
			 WHERE conrelid = to_regclass($1) AND contype = $2 ORDER BY conname`, t.Quoted(), sec.types)
		if err != nil {
			return "", fmt.Errorf("describe %s: %w", t, err)
		}
		cons, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) ([2]string, error) {
			var c [2]string
			err := r.Scan(&c[0], &c[1])
			return c, err
		})
		if err != nil {
			return "", fmt.Errorf("describe %s: %w", t, err)
		}
		if len(cons) > 0 {
			b.WriteString(sec.title + ":\n")
		}
		for _, c := range cons {
			fmt.Fprintf(&b, "    %s %s\n", pgsql.Ident(c[0]), c[1])
		}
	}
	rows, err = q.Query(ctx, `SELECT s.oid::regclass::text, a.attname
		  FROM pg_depend d JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
		  JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
		 WHERE d.refobjid = to_regclass($1) AND d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
		 ORDER BY 1`, t.Quoted())
	if err != nil {
		return "", fmt.Errorf("describe %s: %w", t, err)
	}
	seqs, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) ([2]string, error) {
		var s [2]string
		err := r.Scan(&s[0], &s[1])
		return s, err
	})
	if err != nil {
		return "", fmt.Errorf("describe %s: %w", t, err)
	}
	for _, s := range seqs {
		fmt.Fprintf(&b, "Sequence %s is owned by column %s\n", s[0], pgsql.Ident(s[1]))
	}
	return b.String(), nil
}

var usingRe = regexp.MustCompile(` USING (.*)$`)

// grid lays rows out as psql does: padded columns separated by " | ", a
// "-+-" rule under the header.
func grid(head [4]string, rows [][4]string) string {
	var w [4]int
	for _, r := range append([][4]string{head}, rows...) {
		for i, c := range r {
			w[i] = max(w[i], utf8.RuneCountInString(c))
		}
	}
	var b strings.Builder
	line := func(r [4]string) {
		var l strings.Builder
		for i, c := range r {
			if i > 0 {
				l.WriteString(" | ")
			} else {
				l.WriteString(" ")
			}
			l.WriteString(c + strings.Repeat(" ", w[i]-utf8.RuneCountInString(c)))
		}
		b.WriteString(strings.TrimRight(l.String(), " ") + "\n")
	}
	line(head)
	for i := range w {
		if i > 0 {
			b.WriteString("+")
		}
		b.WriteString(strings.Repeat("-", w[i]+2))
	}
	b.WriteString("\n")
	for _, r := range rows {
		line(r)
	}
	return b.String()
}
