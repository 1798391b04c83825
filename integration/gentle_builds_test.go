package integration

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/rs/zerolog"
	"github.com/shadowctl/shadowctl/internal/catalog"
	"github.com/shadowctl/shadowctl/shadow"
)

// Green's deferred indexes are built at full strength and plainly while the
// application is quiet, and gently and CONCURRENTLY while it is busy: no
// parallel workers, autovacuum's cost delay. An event trigger records the
// settings and the statement each CREATE INDEX over
// green's rows ran with (green is first built empty with every index, which
// it then drops until after the copy); the application is "busy" with sessions idle in a
// transaction (which the pace counts, and which a concurrent build does not
// wait for).
func TestGreenBuildsAreGentleWhileTheApplicationIsBusy(t *testing.T) {
	for _, busy := range []bool{false, true} {
		t.Run(map[bool]string{false: "quiet", true: "busy"}[busy], func(t *testing.T) {
			ctx := context.Background()
			db := newTestDB(t)
			runner := db.runnerNamedShadowctl()

			db.createOrders(5000)
			db.exec(`CREATE TABLE build_settings (index_name text, workers text, cost_delay text, how text)`,
				`CREATE FUNCTION record_build_settings() RETURNS event_trigger LANGUAGE plpgsql AS $$
				BEGIN
					INSERT INTO public.build_settings
					SELECT object_identity, current_setting('max_parallel_maintenance_workers'), current_setting('vacuum_cost_delay'),
					       CASE WHEN current_query() ~* 'CREATE INDEX CONCURRENTLY' THEN 'concurrently' ELSE 'plain' END
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
			want := map[bool]string{false: "2/0 plain", true: "0/2ms concurrently"}[busy]
			rows, err := db.Pool.Query(ctx, `SELECT index_name, workers || '/' || cost_delay || ' ' || how FROM build_settings ORDER BY 1`)
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
				t.Fatalf("green's index builds ran with (workers/cost delay how) %v, want %v", got, wantRows)
			}
			if err := runner.Abort(ctx, m.ID, ""); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// A plain build of green's index holds green's SHARE lock, which the
// trigger's writes wait for. The first write that waits makes the build
// yield (it is cancelled within a poll), and the index is built
// CONCURRENTLY instead. The test holds the build mid-way: the index's
// expression waits, in shadowctl's own sessions only, for an advisory lock
// the test holds. So without the yield the application's write would wait
// until the test let go, and never finish in time.
func TestQuietPlainBuildYieldsToAWaitingWriter(t *testing.T) {
	ctx := context.Background()
	db := newTestDB(t)
	runner := db.runnerNamedShadowctl()

	db.createOrders(2000)
	// The build's lock_timeout does not cut the wait short: it bounds
	// waiting for green, not a build that holds it.
	db.exec(`CREATE FUNCTION held_for_shadowctl(v int) RETURNS int LANGUAGE plpgsql IMMUTABLE SET lock_timeout = 0 AS $$
		BEGIN
			IF current_setting('application_name') = 'shadowctl' THEN
				PERFORM pg_advisory_xact_lock_shared(4242);
			END IF;
			RETURN v;
		END $$`,
		`CREATE INDEX orders_held_idx ON orders (held_for_shadowctl(customer_id))`)
	holder, err := pgx.Connect(ctx, db.DSN)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { holder.Close(context.Background()) })
	if _, err := holder.Exec(ctx, `SELECT pg_advisory_lock(4242)`); err != nil {
		t.Fatal(err)
	}

	m, err := runner.Submit(ctx, shadow.Request{Table: "orders", Alter: "ALTER COLUMN amount TYPE numeric(12,2)"})
	if err != nil {
		t.Fatal(err)
	}
	driven := make(chan error, 1)
	go func() {
		_, err := runner.Drive(ctx, m.ID, shadow.Ready)
		driven <- err
	}()
	waitFor(t, "a plain build holding green to wait for the test's advisory lock", time.Minute, func() (bool, error) {
		var held bool
		err := db.Pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_locks a JOIN pg_locks g ON g.pid = a.pid
			WHERE a.locktype = 'advisory' AND a.objid = 4242 AND NOT a.granted
			  AND g.relation = to_regclass('green.orders') AND g.mode = 'ShareLock' AND g.granted)`).Scan(&held)
		return held, err
	})

	// The application writes: the trigger's upsert into green waits for
	// the build's lock until the build yields.
	wctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	start := time.Now()
	if _, err := db.Pool.Exec(wctx, `UPDATE orders SET status = 'paid' WHERE id = 1`); err != nil {
		t.Fatalf("the application's write, with the plain build held: %v (it waited %s)", err, time.Since(start))
	}
	t.Logf("the application's write waited %s for the plain build to yield", time.Since(start).Round(time.Millisecond))

	if _, err := holder.Exec(ctx, `SELECT pg_advisory_unlock(4242)`); err != nil {
		t.Fatal(err)
	}
	if err := <-driven; err != nil {
		t.Fatalf("drive to ready: %v", err)
	}
	if valid := scalar[bool](db, `SELECT coalesce(bool_and(indisvalid), false) FROM pg_index WHERE indexrelid = to_regclass('green.orders_held_idx')`); !valid {
		t.Fatal("green.orders_held_idx is missing or invalid after the concurrent build")
	}
	db.assertGreenMatches(`SELECT id, status FROM orders ORDER BY id`, `SELECT id, status FROM green.orders ORDER BY id`)
	if err := runner.Abort(ctx, m.ID, ""); err != nil {
		t.Fatal(err)
	}
}

// runnerNamedShadowctl is a runner whose sessions are told apart from the
// application's by their application_name, as the CLI's are (the pace
// counts only the others).
func (db *testDB) runnerNamedShadowctl() *shadow.Runner {
	db.t.Helper()
	cfg, err := pgxpool.ParseConfig(db.DSN)
	if err != nil {
		db.t.Fatal(err)
	}
	cfg.ConnConfig.RuntimeParams["application_name"] = "shadowctl"
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		db.t.Fatal(err)
	}
	db.t.Cleanup(pool.Close)
	return shadow.NewRunner(pool, catalog.New(""), zerolog.Nop())
}
