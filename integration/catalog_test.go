package integration

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/shadowctl/shadowctl/integration/pgtest"
	"github.com/shadowctl/shadowctl/internal/catalog"
	"golang.org/x/sync/errgroup"
)

func TestCatalogInitConcurrentAndIdempotent(t *testing.T) {
	ctx := context.Background()
	dsn := pgtest.NewDatabase(t)
	cat := catalog.New("")

	var g errgroup.Group
	for i := 0; i < 4; i++ {
		g.Go(func() error {
			conn, err := pgx.Connect(ctx, dsn)
			if err != nil {
				return err
			}
			defer conn.Close(ctx)
			_, _, err = cat.Init(ctx, conn)
			return err
		})
	}
	if err := g.Wait(); err != nil {
		t.Fatalf("concurrent init: %v", err)
	}
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	before := schemaFingerprint(t, conn)
	from, to, err := cat.Init(ctx, conn)
	if err != nil || from != to || to != cat.Version() {
		t.Fatalf("re-init: from=%d to=%d err=%v, want no change at version %d", from, to, err, cat.Version())
	}
	if after := schemaFingerprint(t, conn); after != before {
		t.Fatalf("re-init changed the schema:\nbefore %s\nafter  %s", before, after)
	}
	var versions int
	if err := conn.QueryRow(ctx, `SELECT count(*) FROM shadowctl.schema_version`).Scan(&versions); err != nil {
		t.Fatal(err)
	}
	if versions != cat.Version() {
		t.Fatalf("schema_version has %d rows, want %d (one per step)", versions, cat.Version())
	}
	if err := cat.Check(ctx, conn); err != nil {
		t.Fatalf("check after init: %v", err)
	}
}

func TestCatalogCheckReportsMissingCatalog(t *testing.T) {
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, pgtest.NewDatabase(t))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if err := catalog.New("Odd Schema").Check(ctx, conn); err != catalog.ErrNoCatalog {
		t.Fatalf("check on empty database: %v, want ErrNoCatalog", err)
	}
}

// schemaFingerprint is a text digest of every user object's definition.
func schemaFingerprint(t testing.TB, conn *pgx.Conn) string {
	t.Helper()
	var fp string
	err := conn.QueryRow(context.Background(), `
		SELECT md5(string_agg(x, E'\n' ORDER BY x)) FROM (
		  SELECT n.nspname||'.'||c.relname||':'||c.relkind::text||':'||coalesce(
		         (SELECT string_agg(a.attname||' '||format_type(a.atttypid,a.atttypmod)||' '||a.attnotnull::text||' '||coalesce(pg_get_expr(d.adbin,d.adrelid),''), ',' ORDER BY a.attnum)
		            FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid=a.attrelid AND d.adnum=a.attnum
		           WHERE a.attrelid=c.oid AND a.attnum>0 AND NOT a.attisdropped),'') AS x
		    FROM pg_class c JOIN pg_namespace n ON n.oid=c.relnamespace
		   WHERE n.nspname NOT IN ('pg_catalog','information_schema') AND n.nspname NOT LIKE 'pg_toast%'
		  UNION ALL SELECT 'con:'||conrelid::regclass::text||':'||conname||':'||pg_get_constraintdef(oid) FROM pg_constraint WHERE connamespace NOT IN ('pg_catalog'::regnamespace,'information_schema'::regnamespace)
		  UNION ALL SELECT 'trg:'||tgrelid::regclass::text||':'||tgname FROM pg_trigger WHERE NOT tgisinternal
		  UNION ALL SELECT 'fn:'||p.oid::regprocedure::text FROM pg_proc p WHERE pronamespace NOT IN ('pg_catalog'::regnamespace,'information_schema'::regnamespace)
		  UNION ALL SELECT 'nsp:'||nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg_%' AND nspname <> 'information_schema'
		) s`).Scan(&fp)
	if err != nil {
		t.Fatal(err)
	}
	return fp
}
