package integration

import (
	"context"
	"fmt"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/rs/zerolog"
	"github.com/shadowctl/shadowctl/internal/catalog"
	"github.com/shadowctl/shadowctl/shadow"
)

// Green's deferred indexes are built at full strength while the application
// is quiet, and gently while it is busy: no parallel workers, autovacuum's
// cost delay. An event trigger records the settings each CREATE INDEX over
// green's rows ran with (green is first built empty with every index, which
// it then drops until after the copy); the application is "busy" with sessions idle in a
// transaction (which the pace counts, and which a concurrent build does not
// wait for).
func TestGreenBuildsAreGentleWhileTheApplicationIsBusy(t *testing.T) {
	for _, busy := range []bool{false, true} {
		t.Run(map[bool]string{false: "quiet", true: "busy"}[busy], func(t *testing.T) {
			ctx := context.Background()
			db := newTestDB(t)
			// The runner's own sessions are told apart by their
			// application_name, as the CLI's are.
			cfg, err := pgxpool.ParseConfig(db.DSN)
			if err != nil {
				t.Fatal(err)
			}
			cfg.ConnConfig.RuntimeParams["application_name"] = "shadowctl"
			pool, err := pgxpool.NewWithConfig(ctx, cfg)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(pool.Close)
			runner := shadow.NewRunner(pool, catalog.New(""), zerolog.Nop())

			db.createOrders(5000)
			db.exec(`CREATE TABLE build_settings (index_name text, workers text, cost_delay text)`,
				`CREATE FUNCTION record_build_settings() RETURNS event_trigger LANGUAGE plpgsql AS $$
				BEGIN
					INSERT INTO public.build_settings
					SELECT object_identity, current_setting('max_parallel_maintenance_workers'), current_setting('vacuum_cost_delay')
					  FROM pg_event_trigger_ddl_commands() WHERE schema_name = 'green' AND object_type = 'index'
					   AND pg_relation_size(to_regclass('green.orders')) > 0;
				END $$`,
				`CREATE EVENT TRIGGER record_build_settings ON ddl_command_end WHEN TAG IN ('CREATE INDEX')
					EXECUTE FUNCTION record_build_settings()`)
			if busy {
				for i := 0; i < 3; i++ {
					c, err := pgx.Connect(ctx, db.DSN)
					if err != nil {
						t.Fatal(err)
					}
					t.Cleanup(func() { c.Close(context.Background()) })
					if _, err := c.Exec(ctx, `BEGIN; SELECT 1`); err != nil {
						t.Fatal(err)
					}
				}
			}
			m, err := runner.Submit(ctx, shadow.Request{Table: "orders", Alter: "ALTER COLUMN amount TYPE numeric(12,2)"})
			if err != nil {
				t.Fatal(err)
			}
			if m, err = runner.Drive(ctx, m.ID, shadow.Ready); err != nil || m.Phase != shadow.Ready {
				t.Fatalf("drive: %v %v", m.Phase, err)
			}
			want := map[bool]string{false: "2/0", true: "0/2ms"}[busy]
			rows, err := db.Pool.Query(ctx, `SELECT index_name, workers || '/' || cost_delay FROM build_settings ORDER BY 1`)
			if err != nil {
				t.Fatal(err)
			}
			got, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (string, error) {
				var name, settings string
				err := r.Scan(&name, &settings)
				return fmt.Sprintf("%s %s", name, settings), err
			})
			if err != nil {
				t.Fatal(err)
			}
			wantRows := []string{"green.orders_created_at_idx " + want, "green.orders_customer_id_idx " + want}
			if fmt.Sprint(got) != fmt.Sprint(wantRows) {
				t.Fatalf("green's index builds ran with (workers/cost delay) %v, want %v", got, wantRows)
			}
			if err := runner.Abort(ctx, m.ID, ""); err != nil {
				t.Fatal(err)
			}
		})
	}
}
