package integration

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/shadowctl/shadowctl/shadow"
	"github.com/shadowctl/shadowctl/sync"
)

// readyLogical submits a logical-sync migration of table and drives it to
// ready. No process reads the slot afterwards, so blue's later changes wait
// in it until applyBacklog.
func (db *testDB) readyLogical(table, alter string) *shadow.Migration {
	db.t.Helper()
	return db.ready(shadow.Request{Table: table, Alter: alter, Sync: shadow.SyncLogical})
}

// applyBacklog marks the end of the WAL, runs a follower until green has
// applied everything before the mark, stops it and reports how long the
// apply took (from the follower's start) and the CPU time it cost: in the
// server processes of this database (0 when the server is not local), in
// the WAL sender alone, and in this process.
func (db *testDB) applyBacklog(id string) (took, serverCPU, walsenderCPU, clientCPU time.Duration) {
	db.t.Helper()
	ctx := context.Background()
	mark := scalar[string](db, `SELECT pg_logical_emit_message(true, $1, 'test')::text`, sync.MarkerPrefix)
	server0, client0 := db.serverCPU(), processCPU()
	fctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	start := time.Now()
	go func() { done <- db.Runner.Follow(fctx, id) }()
	for {
		var ok bool
		if err := db.Pool.QueryRow(ctx, `SELECT applied_lsn >= $2::text::pg_lsn FROM shadowctl.sync_positions WHERE migration_id = $1`, id, mark).Scan(&ok); err != nil {
			stop()
			db.t.Fatal(err)
		}
		if ok {
			break
		}
		select {
		case err := <-done: // the follower gave up (or failed the migration)
			stop()
			db.t.Fatalf("the follower stopped before applying up to %s: %v", mark, err)
		case <-time.After(5 * time.Millisecond): // poll interval
		}
	}
	took = time.Since(start)
	server1, client1 := db.serverCPU(), processCPU()
	stop()
	<-done
	for pid, t := range server1 {
		serverCPU += t.cpu - server0[pid].cpu
		if t.walsender {
			walsenderCPU += t.cpu - server0[pid].cpu
		}
	}
	return took, serverCPU, walsenderCPU, client1 - client0
}

type procCPU struct {
	cpu       time.Duration
	walsender bool
}

// serverCPU reads the CPU time of each server process connected to the
// test's database from /proc (Linux, local server; else nothing).
func (db *testDB) serverCPU() map[int]procCPU {
	out := map[int]procCPU{}
	rows, err := db.Pool.Query(context.Background(), `SELECT pid, backend_type = 'walsender' FROM pg_stat_activity WHERE datname = current_database()`)
	if err != nil {
		db.t.Fatal(err)
	}
	type proc struct {
		Pid       int32
		Walsender bool
	}
	procs, err := pgx.CollectRows(rows, pgx.RowToStructByPos[proc])
	if err != nil {
		db.t.Fatal(err)
	}
	for _, p := range procs {
		pid := p.Pid
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		// Fields after the command's closing parenthesis; utime and stime
		// are the 12th and 13th, in clock ticks (100 per second on Linux).
		f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
		if len(f) < 13 {
			continue
		}
		u, _ := strconv.ParseInt(f[11], 10, 64)
		s, _ := strconv.ParseInt(f[12], 10, 64)
		out[int(pid)] = procCPU{time.Duration(u+s) * 10 * time.Millisecond, p.Walsender}
	}
	return out
}

// processCPU is this process's CPU time so far.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkLogicalApply measures how fast the applier drains a backlog: it
// writes N row changes to blue while nothing reads the slot (pgbench-like
// transactions of one INSERT and two UPDATEs, with DELETEs, key changes and
// a few large transactions mixed in), then times a follower applying them and
// reports changes/s and the CPU time per change, server side (WAL sender
// included) and in this process. N is SHADOWCTL_APPLY_CHANGES (default
// 200,000). Green is checked against blue afterwards. Run it alone, e.g.
//
//	go test -run '^$' -bench LogicalApply -benchtime 1x ./integration/
func BenchmarkLogicalApply(b *testing.B) {
	target := 200000
	if s := os.Getenv("SHADOWCTL_APPLY_CHANGES"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil {
			b.Fatalf("SHADOWCTL_APPLY_CHANGES: %v", err)
		}
		target = n
	}
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		db := newTestDB(b)
		const rows = 100000
		db.createOrders(rows)
		m := db.readyLogical("orders", "ALTER COLUMN amount TYPE numeric(12,2)")
		// Each loop turn is one transaction; its changes are counted exactly
		// (every statement below hits existing rows only).
		var changes int
		txns := 0
		for changes < target {
			txns++
			changes += 3
			if txns%5 == 0 {
				changes++
			}
			if txns%100 == 50 {
				changes++
			}
			if txns%1000 == 0 {
				changes += 500
			}
		}
		start := time.Now()
		db.exec(fmt.Sprintf(`DO $$
DECLARE base int := (SELECT max(id) FROM orders);
BEGIN
  FOR i IN 1..%d LOOP
    INSERT INTO orders (customer_id, customer_name, amount, status) VALUES (1 + i %% 1000, 'customer ' || (1 + i %% 1000), i / 3.0, 'new');
    UPDATE orders SET status = 'paid', amount = amount + 1 WHERE id = 1 + (i::bigint * 7919) %% %[2]d;
    UPDATE orders SET status = 'shipped' WHERE id = 1 + (i::bigint * 104729) %% %[2]d;
    -- Deleted rows were inserted by turns = 2 (mod 5), re-keyed ones by turns = 3 (mod 5).
    IF i %% 5 = 0 THEN DELETE FROM orders WHERE id = base + i - 3; END IF;
    IF i %% 100 = 50 THEN UPDATE orders SET id = -id WHERE id = base + i - 2; END IF;
    IF i %% 1000 = 0 THEN UPDATE orders SET status = 'bulk ' || i WHERE id BETWEEN i %% %[2]d + 1 AND i %% %[2]d + 500; END IF;
    COMMIT;
  END LOOP;
END $$`, txns, rows))
		b.Logf("wrote %d changes in %d transactions in %s", changes, txns, time.Since(start).Round(time.Millisecond))
		b.StartTimer()
		took, serverCPU, walsenderCPU, clientCPU := db.applyBacklog(m.ID)
		b.StopTimer()
		// CPU per change is the figure to compare on a busy machine, where
		// the wall time depends on what else runs.
		b.ReportMetric(float64(changes)/took.Seconds(), "changes/s")
		b.ReportMetric(float64(serverCPU.Microseconds())/float64(changes), "server-µs/change")
		b.ReportMetric(float64(clientCPU.Microseconds())/float64(changes), "client-µs/change")
		b.Logf("applied %d changes in %s: %.0f changes/s; CPU: server %s (of which the WAL sender %s), this process %s", changes, took.Round(time.Millisecond),
			float64(changes)/took.Seconds(), serverCPU.Round(time.Millisecond), walsenderCPU.Round(time.Millisecond), clientCPU.Round(time.Millisecond))
		db.assertGreenMatches(`SELECT id, customer_id, customer_name, amount::numeric(12,2), status, created_at FROM public.orders`,
			`SELECT id, customer_id, customer_name, amount, status, created_at FROM green.orders`)
		if err := db.Runner.Abort(context.Background(), m.ID, ""); err != nil {
			b.Fatal(err)
		}
	}
}

// One burst of changes, applied in one go after the fact, with everything
// that makes grouping changes into multi-row statements delicate: repeated
// keys, delete then re-insert of a key, key changes (also chained, onto a key
// just vacated, and of rows whose TOASTed values are unchanged), unique
// values swapped between rows, NULLs, and a hot key over many small
// transactions; with and without a unique index besides the key (which
// decides whether repeated upserts of a key merge). Green must equal the
// mapping of blue exactly: a computed column (over a TOASTed column) and a
// USING expression (so an unchanged value must come from blue) are part of
// the mapping.
func TestLogicalApplyBurst(t *testing.T) {
	for _, tc := range []struct{ name, key, unique, identity string }{
		{"int key", "int", "UNIQUE", ""},
		// Without a unique index but the key, repeated upserts of a key merge.
		{"int key no other unique index", "int", "", ""},
		{"replica identity full", "int", "UNIQUE", "ALTER TABLE docs REPLICA IDENTITY FULL"},
		{"numeric key", "numeric", "UNIQUE", ""}, // text of equal values may differ: no grouping by key text
	} {
		t.Run(tc.name, func(t *testing.T) {
			db := newTestDB(t)
			db.exec(`CREATE TABLE docs (id `+tc.key+` PRIMARY KEY, code text NOT NULL `+tc.unique+`, title text, body text, note text)`,
				`ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL, ALTER COLUMN note SET STORAGE EXTERNAL`, // out of line: 'u' when unchanged
				`CREATE FUNCTION big(int) RETURNS text LANGUAGE sql AS $$ SELECT string_agg(md5($1::text || i::text), '') FROM generate_series(1, 100) i $$`,
				`INSERT INTO docs SELECT g, 'c' || g, 'title ' || g, big(g), big(g + 1000) FROM generate_series(1, 40) g`)
			if tc.identity != "" {
				db.exec(tc.identity)
			}
			ctx := context.Background()
			m, err := db.Runner.Submit(ctx, shadow.Request{Table: "docs", Sync: shadow.SyncLogical,
				Alter: "ALTER COLUMN title TYPE varchar(200), ALTER COLUMN note TYPE text USING upper(note), ADD COLUMN body_len int",
				Map:   map[string]string{"body_len": "length(body)"}})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = db.Runner.Abort(context.WithoutCancel(ctx), m.ID, "") })
			if _, err := db.Runner.Drive(ctx, m.ID, shadow.Ready); err != nil {
				t.Fatal(err)
			}
			db.exec(`BEGIN;
				UPDATE docs SET title = 'one ' || id WHERE id BETWEEN 1 AND 10;
				UPDATE docs SET title = 'two ' || id WHERE id BETWEEN 1 AND 5;
				DELETE FROM docs WHERE id = 3;
				INSERT INTO docs VALUES (3, 'c3', 'reborn', 'small body', 'small note');
				UPDATE docs SET id = 100 WHERE id = 4;
				UPDATE docs SET id = 4 WHERE id = 5;
				UPDATE docs SET id = 5, title = 'back' WHERE id = 100;
				UPDATE docs SET code = 'tmp' WHERE id = 6;
				UPDATE docs SET code = 'c6' WHERE id = 7;
				UPDATE docs SET code = 'c7' WHERE id = 6;
				UPDATE docs SET id = 200 WHERE id = 8;
				UPDATE docs SET body = body || 'x' WHERE id = 9;
				UPDATE docs SET note = NULL WHERE id = 10;
				INSERT INTO docs VALUES (50, 'c50', 'new', big(50), NULL);
				UPDATE docs SET title = 'newer' WHERE id = 50;
				DELETE FROM docs WHERE id = 50;
				DELETE FROM docs WHERE id IN (11, 12);
				COMMIT`,
				`BEGIN;
				UPDATE docs SET id = id + 1000 WHERE id BETWEEN 20 AND 30;
				UPDATE docs SET title = 'moved' WHERE id > 1000;
				INSERT INTO docs VALUES (20, 'c20 again', 'reused key', big(20), big(21));
				UPDATE docs SET id = 21 WHERE id = 1021;
				COMMIT`,
				`UPDATE docs SET code = code || '-z'`,
				`DELETE FROM docs WHERE id::int % 7 = 0`,
				`INSERT INTO docs VALUES (7, 'c7-z-new', 'reinserted', big(7), big(8))`)
			for i := 0; i < 30; i++ { // a hot key over small transactions
				db.exec(fmt.Sprintf(`UPDATE docs SET title = 'hot %d' WHERE id = 1`, i))
			}
			_, _, _, _ = db.applyBacklog(m.ID)
			db.assertGreenMatches(`SELECT id, code, title::varchar(200), body, upper(note), length(body) FROM public.docs`,
				`SELECT id, code, title, body, note, body_len FROM green.docs`)
		})
	}
}
