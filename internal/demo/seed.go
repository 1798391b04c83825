package demo

import (
	"context"
	"fmt"
	"strconv"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/shadowctl/shadowctl/internal/pgsql"
)

// The demo's tables. Every name goes through pgsql quoting, even these.
var (
	customersTable = pgsql.QualifiedName{Schema: "public", Name: "customers"}
	ordersTable    = pgsql.QualifiedName{Schema: "public", Name: "orders"}
)

var statuses = []string{"new", "paid", "shipped"}

// seedRow is the row the seed wrote for id g (1 ≤ g ≤ rows). The seed is a
// pure function of g so that the load's model needs to remember only the rows
// it touched, not a million untouched ones.
func seedRow(g int64, customers int) orderRow {
	cid := int(1 + (g*7919)%int64(customers))
	return orderRow{
		CustomerID:  cid,
		AmountCents: (g * 104729) % 100000,
		Status:      statuses[g%3],
		Email:       emailMapped,
	}
}

// customerEmail is the email the seed gives customer id.
func customerEmail(id int) string { return "c" + strconv.Itoa(id) + "@example.com" }

func customerName(id int) string { return "customer " + strconv.Itoa(id) }

// Seed creates customers and orders and fills them with generate_series. The
// orders are loaded into a bare table and the primary key, indexes and the
// foreign key are added afterwards: building an index once is several times
// faster than maintaining it row by row, and one validating join is faster
// than a million foreign-key trigger calls. The SQL mirrors seedRow exactly.
func Seed(ctx context.Context, pool *pgxpool.Pool, rows int64, customers int) error {
	c, o := customersTable.Quoted(), ordersTable.Quoted()
	stmts := []string{
		fmt.Sprintf(`CREATE TABLE %s (id int PRIMARY KEY, name text NOT NULL, email text NOT NULL)`, c),
		fmt.Sprintf(`INSERT INTO %s SELECT g, 'customer ' || g, 'c' || g || '@example.com' FROM generate_series(1, %d) g`, c, customers),
		fmt.Sprintf(`CREATE TABLE %s (
			id serial NOT NULL,
			customer_id int,
			customer_name text,
			amount float8,
			status text DEFAULT 'new',
			created_at timestamptz DEFAULT now())`, o),
		fmt.Sprintf(`INSERT INTO %[1]s (id, customer_id, customer_name, amount, status, created_at)
			SELECT g, 1 + (g * 7919) %% %[2]d, 'customer ' || (1 + (g * 7919) %% %[2]d),
			       ((g * 104729) %% 100000)::float8 / 100, (ARRAY['new', 'paid', 'shipped'])[1 + g %% 3],
			       now() - (g %% 86400) * interval '1 second'
			  FROM generate_series(1::bigint, %[3]d) g`, o, customers, rows),
		fmt.Sprintf(`SELECT setval(pg_get_serial_sequence(%s, 'id'), %d)`, pgsql.Literal(o), max(rows, 1)),
		fmt.Sprintf(`ALTER TABLE %s ADD CONSTRAINT %s PRIMARY KEY (id)`, o, pgsql.Ident("orders_pkey")),
		fmt.Sprintf(`CREATE INDEX %s ON %s (customer_id)`, pgsql.Ident("orders_customer_id_idx"), o),
		fmt.Sprintf(`CREATE INDEX %s ON %s (created_at)`, pgsql.Ident("orders_created_at_idx"), o),
		fmt.Sprintf(`ALTER TABLE %s ADD CONSTRAINT %s FOREIGN KEY (customer_id) REFERENCES %s (id)`, o, pgsql.Ident("orders_customer_id_fkey"), c),
		fmt.Sprintf(`VACUUM (ANALYZE) %s`, c),
		fmt.Sprintf(`VACUUM (ANALYZE) %s`, o),
	}
	conn, err := pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("seed: %w", err)
	}
	defer conn.Release()
	if _, err := conn.Exec(ctx, `SET maintenance_work_mem = '256MB'`); err != nil {
		return fmt.Errorf("seed: %w", err)
	}
	for _, s := range stmts {
		if err := ctx.Err(); err != nil {
			return err
		}
		if _, err := conn.Exec(ctx, s, pgx.QueryExecModeSimpleProtocol); err != nil {
			return fmt.Errorf("seed: %s: %w", firstLine(s), err)
		}
	}
	_, err = conn.Exec(ctx, `RESET maintenance_work_mem`)
	return err
}

func firstLine(s string) string {
	for i, r := range s {
		if r == '\n' {
			return s[:i] + " …"
		}
	}
	return s
}
