package integration

import (
	"context"
	"fmt"
	"strings"
	"testing"

	"github.com/shadowctl/shadowctl/shadow"
)

// Issue 3, done-when 7: a table whose schema, name and columns need quoting
// (upper case, spaces, double quotes) and whose name is 63 bytes long (so the
// parked blue's name must be cut) goes through start → cutover → rollback →
// cutover → finalize with writes through its name at every step, with a
// green schema that needs quoting too, and ends exact.
func TestIssue3QuotedNamesLifecycle(t *testing.T) {
	db := newTestDB(t)
	ctx := context.Background()
	schema := `My "App" Schema`
	table := `Order Lines "Q" `
	table += strings.Repeat("X", 63-len(table))
	if len(table) != 63 {
		t.Fatalf("table name is %d bytes", len(table))
	}
	T := qn(schema, table)
	db.exec(
		`CREATE SCHEMA `+qi(schema),
		fmt.Sprintf(`CREATE TABLE %s ("Id" serial PRIMARY KEY, "Line Total" float8 NOT NULL, "a""b" text, "lower" text DEFAULT 'd')`, T),
		fmt.Sprintf(`CREATE INDEX ON %s ("a""b")`, T),
		fmt.Sprintf(`INSERT INTO %s ("Line Total", "a""b") SELECT g * 0.25, 'row ' || g FROM generate_series(1, 500) g`, T),
		// The model: what the table must hold, written alongside.
		`CREATE TABLE model (id int PRIMARY KEY, total numeric(12,2), ab text)`,
		fmt.Sprintf(`INSERT INTO model SELECT "Id", "Line Total"::numeric(12,2), "a""b" FROM %s`, T),
	)
	m, err := db.Runner.Submit(ctx, shadow.Request{
		Table:       T, // as an operator types it: each part in double quotes, inner quotes doubled
		Alter:       `ALTER COLUMN "Line Total" TYPE numeric(12,2), ADD COLUMN "New ""Col""" text`,
		Map:         map[string]string{`New "Col"`: `upper("a""b")`},
		GreenSchema: `Green "Side"`,
		BatchSize:   100,
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.Runner.Drive(ctx, m.ID, shadow.Ready); err != nil {
		t.Fatal(err)
	}
	G := qn(`Green "Side"`, table)
	db.assertGreenMatches(
		fmt.Sprintf(`SELECT "Id", "Line Total"::numeric(12,2), "a""b", "lower", upper("a""b") FROM %s`, T),
		fmt.Sprintf(`SELECT "Id", "Line Total", "a""b", "lower", "New ""Col""" FROM %s`, G))

	k := 0
	write := func(step string) {
		t.Helper()
		for i := 0; i < 5; i++ {
			k++
			var id int
			if err := db.Pool.QueryRow(ctx, fmt.Sprintf(`INSERT INTO %s ("Line Total", "a""b") VALUES ($1, $2) RETURNING "Id"`, T), float64(k)/4, step).Scan(&id); err != nil {
				t.Fatalf("%s: insert through the table's name: %v", step, err)
			}
			db.exec(fmt.Sprintf(`INSERT INTO model VALUES (%d, %g, %s)`, id, float64(k)/4, quoteLiteral(step)))
			db.exec(fmt.Sprintf(`UPDATE %s SET "Line Total" = "Line Total" + 1, "a""b" = 'updated' WHERE "Id" = %d`, T, 3*k),
				fmt.Sprintf(`UPDATE model SET total = total + 1, ab = 'updated' WHERE id = %d`, 3*k),
				fmt.Sprintf(`DELETE FROM %s WHERE "Id" = %d`, T, 3*k+1),
				fmt.Sprintf(`DELETE FROM model WHERE id = %d`, 3*k+1))
		}
		db.assertGreenMatches(`SELECT id, total, ab FROM model`, fmt.Sprintf(`SELECT "Id", "Line Total"::numeric(12,2), "a""b" FROM %s`, T))
	}
	write("ready")
	opts := shadow.CutoverOptions{}
	for _, s := range []struct {
		name string
		fn   func() (*shadow.Migration, error)
		want shadow.Phase
	}{
		{"cutover", func() (*shadow.Migration, error) { return db.Runner.Cutover(ctx, m.ID, opts) }, shadow.CutOver},
		{"rollback", func() (*shadow.Migration, error) { return db.Runner.Rollback(ctx, m.ID, opts) }, shadow.RolledBack},
		{"cutover again", func() (*shadow.Migration, error) { return db.Runner.Cutover(ctx, m.ID, opts) }, shadow.CutOver},
		{"finalize", func() (*shadow.Migration, error) { return db.Runner.Finalize(ctx, m.ID, 0, true, opts) }, shadow.Finalized},
	} {
		got, err := s.fn()
		if err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		if got.Phase != s.want {
			t.Fatalf("%s: phase %s, want %s", s.name, got.Phase, s.want)
		}
		write("after " + s.name)
	}
	if typ := scalar[string](db, `SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = to_regclass($1) AND attname = 'Line Total'`, T); typ != "numeric(12,2)" {
		t.Fatalf(`"Line Total" is %s after finalize`, typ)
	}
	if kind := scalar[string](db, `SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1)`, T); kind != "r" {
		t.Fatalf("%s is relkind %s after finalize, want a table", T, kind)
	}
	// Rows copied and never updated since keep the mapped value (rows the
	// application updated while green served carry what it wrote).
	if n := scalar[int](db, fmt.Sprintf(`SELECT count(*) FROM %s WHERE "New ""Col""" IS DISTINCT FROM upper("a""b") AND "a""b" LIKE 'row %%'`, T)); n != 0 {
		t.Fatalf("%d copied rows have a wrong mapped column", n)
	}
	assertNoToolObjects(t, db, `Green "Side"`)
}

func quoteLiteral(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }
