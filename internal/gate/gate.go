// Package gate owns the deploy gate behind `shadowctl check` and
// `shadowctl wait`: read-only checks of the live schema (a column and its
// type and nullability, a column's absence, an index and its validity) and of
// a migration's phase in the catalog, and the wait loop that LISTENs for the
// core's NOTIFY on channel "shadowctl" and polls the catalog until a phase is
// reached, the migration fails, or time runs out. It changes nothing.
package gate

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/shadowctl/shadowctl/internal/pgsql"
)

// Operator-facing conditions.
var (
	// ErrBadName means a table, column or index name could not be parsed.
	ErrBadName = errors.New("bad name")
	// ErrUnknownType means --type names no type this database knows.
	ErrUnknownType = errors.New("unknown type")
	// ErrUnknownPhase means --phase is not a phase one can wait for.
	ErrUnknownPhase = errors.New("unknown phase")
)

// Result is a check's verdict and its one-line reason.
type Result struct {
	OK     bool
	Reason string
}

func pass(format string, a ...any) Result { return Result{OK: true, Reason: fmt.Sprintf(format, a...)} }
func fail(format string, a ...any) Result {
	return Result{OK: false, Reason: fmt.Sprintf(format, a...)}
}

// splitName cuts a dotted name into its parts (see pgsql.ParseName).
func splitName(s string) ([]string, error) {
	parts, err := pgsql.ParseName(s)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadName, err)
	}
	return parts, nil
}

// relation splits "[schema.]table.column" (withColumn) or "[schema.]name".
func relation(s string, withColumn bool) (rel pgx.Identifier, column string, err error) {
	parts, err := splitName(s)
	if err != nil {
		return nil, "", err
	}
	if withColumn {
		if len(parts) < 2 || len(parts) > 3 {
			return nil, "", fmt.Errorf("%q: want table.column or schema.table.column: %w", s, ErrBadName)
		}
		return pgx.Identifier(parts[:len(parts)-1]), parts[len(parts)-1], nil
	}
	if len(parts) > 2 {
		return nil, "", fmt.Errorf("%q: want name or schema.name: %w", s, ErrBadName)
	}
	return pgx.Identifier(parts), "", nil
}

func display(id pgx.Identifier, col string) string {
	s := id.Sanitize()
	if col != "" {
		s += "." + pgsql.Ident(col)
	}
	return s
}

// ColumnCheck asks for a column, optionally of a type and NOT NULL.
type ColumnCheck struct {
	Column  string // [schema.]table.column
	Type    string // optional; with a modifier (varchar(80)) the modifier must match too
	NotNull bool
}

// CheckColumn passes when the column exists (with the type and NOT NULL
// asked for). NOT NULL means the column's attnotnull flag; a CHECK (c IS NOT
// NULL) constraint does not count.
func CheckColumn(ctx context.Context, conn *pgx.Conn, c ColumnCheck) (Result, error) {
	rel, col, err := relation(c.Column, true)
	if err != nil {
		return Result{}, err
	}
	name := display(rel, col)
	var exists bool
	var typeOID uint32
	var typeMod int32
	var notNull bool
	var typeFull, typeBase string
	err = conn.QueryRow(ctx, `SELECT true, a.atttypid, a.atttypmod, a.attnotnull,
			format_type(a.atttypid, a.atttypmod), format_type(a.atttypid, NULL)
		FROM pg_attribute a
		WHERE a.attrelid = to_regclass($1) AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped`,
		rel.Sanitize(), col).Scan(&exists, &typeOID, &typeMod, &notNull, &typeFull, &typeBase)
	if errors.Is(err, pgx.ErrNoRows) {
		var tableExists bool
		if err := conn.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL`, rel.Sanitize()).Scan(&tableExists); err != nil {
			return Result{}, fmt.Errorf("check column %s: %w", name, err)
		}
		if !tableExists {
			return fail("column %s: table %s does not exist", name, rel.Sanitize()), nil
		}
		return fail("column %s does not exist", name), nil
	}
	if err != nil {
		return Result{}, fmt.Errorf("check column %s: %w", name, err)
	}
	if c.Type != "" {
		wantFull, wantBase, hasMod, err := resolveType(ctx, conn, c.Type)
		if err != nil {
			return Result{}, err
		}
		if typeBase != wantBase || (hasMod && typeFull != wantFull) {
			want := wantBase
			if hasMod {
				want = wantFull
			}
			return fail("column %s is %s, not %s", name, typeFull, want), nil
		}
	}
	if c.NotNull && !notNull {
		return fail("column %s (%s) is nullable, not NOT NULL", name, typeFull), nil
	}
	nn := ""
	if notNull {
		nn = " NOT NULL"
	}
	return pass("column %s exists: %s%s", name, typeFull, nn), nil
}

// resolveType has the server parse the type text (prepared, never executed)
// and returns its canonical name with and without modifier.
func resolveType(ctx context.Context, conn *pgx.Conn, t string) (full, base string, hasMod bool, err error) {
	if strings.ContainsAny(t, ";") {
		return "", "", false, fmt.Errorf("--type %q: %w", t, ErrUnknownType)
	}
	sd, err := conn.Prepare(ctx, "", "SELECT NULL::"+t)
	if err != nil {
		return "", "", false, fmt.Errorf("--type %q: %w: %s", t, ErrUnknownType, pgsql.Describe(err))
	}
	if len(sd.Fields) != 1 {
		return "", "", false, fmt.Errorf("--type %q: %w", t, ErrUnknownType)
	}
	f := sd.Fields[0]
	if err := conn.QueryRow(ctx, `SELECT format_type($1, $2), format_type($1, NULL)`, f.DataTypeOID, f.TypeModifier).Scan(&full, &base); err != nil {
		return "", "", false, fmt.Errorf("--type %q: %w", t, err)
	}
	return full, base, f.TypeModifier != -1, nil
}

// CheckNoColumn passes when the column does not exist (nor its table).
func CheckNoColumn(ctx context.Context, conn *pgx.Conn, column string) (Result, error) {
	rel, col, err := relation(column, true)
	if err != nil {
		return Result{}, err
	}
	name := display(rel, col)
	var tableExists, colExists bool
	err = conn.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL,
		EXISTS (SELECT FROM pg_attribute WHERE attrelid = to_regclass($1) AND attname = $2 AND attnum > 0 AND NOT attisdropped)`,
		rel.Sanitize(), col).Scan(&tableExists, &colExists)
	if err != nil {
		return Result{}, fmt.Errorf("check no column %s: %w", name, err)
	}
	switch {
	case !tableExists:
		return pass("column %s does not exist (nor its table)", name), nil
	case colExists:
		return fail("column %s still exists", name), nil
	}
	return pass("column %s does not exist", name), nil
}

// CheckIndex passes when the index exists (and, with valid, is valid, ready
// and live: usable by queries and maintained by writes).
func CheckIndex(ctx context.Context, conn *pgx.Conn, index string, valid bool) (Result, error) {
	rel, _, err := relation(index, false)
	if err != nil {
		return Result{}, err
	}
	name := rel.Sanitize()
	var isIndex, isValid, isReady, isLive bool
	var table string
	err = conn.QueryRow(ctx, `SELECT c.relkind IN ('i', 'I'), coalesce(i.indisvalid, false), coalesce(i.indisready, false),
			coalesce(i.indislive, false), coalesce(i.indrelid::regclass::text, '')
		FROM pg_class c LEFT JOIN pg_index i ON i.indexrelid = c.oid
		WHERE c.oid = to_regclass($1)`, name).Scan(&isIndex, &isValid, &isReady, &isLive, &table)
	if errors.Is(err, pgx.ErrNoRows) {
		return fail("index %s does not exist", name), nil
	}
	if err != nil {
		return Result{}, fmt.Errorf("check index %s: %w", name, err)
	}
	if !isIndex {
		return fail("%s exists but is not an index", name), nil
	}
	if valid && !(isValid && isReady && isLive) {
		return fail("index %s on %s exists but is INVALID (a failed or unfinished concurrent build)", name, table), nil
	}
	state := "valid"
	if !isValid {
		state = "INVALID"
	}
	return pass("index %s on %s exists (%s)", name, table, state), nil
}
