package integration

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/shadowctl/shadowctl/backfill"
	"github.com/shadowctl/shadowctl/shadow"
)

// recordBatches records every batch's checkpoint, per range, in order.
func recordBatches(db *testDB) (get func() map[int][]backfill.Range) {
	var mu sync.Mutex
	byRange := map[int][]backfill.Range{}
	db.Runner.Failpoints.CopyBatch = func(ctx context.Context, r backfill.Range) error {
		mu.Lock()
		defer mu.Unlock()
		byRange[r.No] = append(byRange[r.No], r)
		return nil
	}
	return func() map[int][]backfill.Range {
		mu.Lock()
		defer mu.Unlock()
		return byRange
	}
}

// assertBatchBounds checks each range's batches against the keys blue holds
// in that range (keysSQL lists them in key order as text arrays, between the
// range's bounds): a batch that is not the range's last took exactly size
// keys and checkpointed the last of them; the last batch took the rest and
// checkpointed the range's last key.
func assertBatchBounds(t *testing.T, db *testDB, size int, byRange map[int][]backfill.Range, keysIn func(r backfill.Range) [][]string) {
	t.Helper()
	if len(byRange) == 0 {
		t.Fatal("no batch was recorded")
	}
	for no, batches := range byRange {
		last := batches[len(batches)-1]
		keys := keysIn(last)
		if !last.Done {
			t.Fatalf("range %d: its last batch is not done: %+v", no, last)
		}
		if last.Rows != int64(len(keys)) {
			t.Fatalf("range %d: the batches counted %d keys, blue has %d in the range", no, last.Rows, len(keys))
		}
		for i, b := range batches {
			if b.Rows == 0 {
				continue // a batch after a full one that found nothing left
			}
			if !b.Done && b.Rows%int64(size) != 0 {
				t.Fatalf("range %d, batch %d: a batch that is not the last took %d keys in all, not a multiple of %d", no, i, b.Rows, size)
			}
			if want := keys[b.Rows-1]; !slices.Equal(b.Last, want) {
				t.Fatalf("range %d, batch %d (%d keys so far): checkpointed key %v, want the %d-th key %v", no, i, b.Rows, b.Last, b.Rows, want)
			}
		}
	}
}

// A copy batch's bounds: full batches end exactly at their size-th key, and
// the range's last batch (fewer keys) counts them and ends at the range's
// last key, with an integer key split into ranges with upper bounds, in both
// sync modes (guarded by key buckets, and unlocked).
func TestCopyBatchBoundsIntegerKey(t *testing.T) {
	forEachSyncMode(t, func(t *testing.T, mode shadow.SyncMode) {
		db := newTestDB(t)
		// Keys with gaps, so a batch's size-th key is not its lower bound plus size.
		db.exec(`CREATE TABLE gappy (id int PRIMARY KEY, v int)`,
			`INSERT INTO gappy SELECT g, g FROM generate_series(1, 12000) g WHERE g % 7 <> 0 AND g % 11 <> 3`)
		get := recordBatches(db)
		const size = 37
		db.ready(shadow.Request{Table: "gappy", Alter: "ALTER COLUMN v TYPE bigint", Sync: mode, BatchSize: size, Workers: 2})
		byRange := get()
		if len(byRange) < 2 {
			t.Fatalf("%d ranges, want at least 2 (the test covers ranges with an upper bound)", len(byRange))
		}
		assertBatchBounds(t, db, size, byRange, func(r backfill.Range) [][]string {
			conds := []string{"true"}
			if r.Lower != nil {
				conds = append(conds, "id > "+r.Lower[0])
			}
			if r.Upper != nil {
				conds = append(conds, "id <= "+r.Upper[0])
			}
			return keyList(t, db, `SELECT ARRAY[id::text] FROM gappy WHERE `+strings.Join(conds, " AND ")+` ORDER BY id`)
		})
		db.assertGreenMatches(`SELECT id, v::bigint FROM public.gappy`, `SELECT id, v FROM green.gappy`)
	})
}

// The same with a two-column text key (one range, no upper bound): the last
// batch's end is read backwards over both columns.
func TestCopyBatchBoundsCompositeKey(t *testing.T) {
	forEachSyncMode(t, func(t *testing.T, mode shadow.SyncMode) {
		db := newTestDB(t)
		db.exec(`CREATE TABLE pairs (region text, no int, v text, PRIMARY KEY (region, no))`,
			`INSERT INTO pairs SELECT 'r' || (g % 7), g, 'v' || g FROM generate_series(1, 1000) g`)
		get := recordBatches(db)
		const size = 45
		db.ready(shadow.Request{Table: "pairs", Alter: "ALTER COLUMN v TYPE varchar(20)", Sync: mode, BatchSize: size, Workers: 2})
		assertBatchBounds(t, db, size, get(), func(r backfill.Range) [][]string {
			return keyList(t, db, `SELECT ARRAY[region, no::text] FROM pairs ORDER BY region, no`)
		})
		db.assertGreenMatches(`SELECT region, no, v::varchar(20) FROM public.pairs`, `SELECT region, no, v FROM green.pairs`)
	})
}

// A table whose rows are an exact multiple of the batch size: the last full
// batch is followed by one that finds nothing and ends the range.
func TestCopyBatchBoundsExactMultiple(t *testing.T) {
	db := newTestDB(t)
	db.exec(`CREATE TABLE even (id int PRIMARY KEY, v int)`,
		`INSERT INTO even SELECT g, g FROM generate_series(1, 120) g`)
	get := recordBatches(db)
	db.ready(shadow.Request{Table: "even", Alter: "ALTER COLUMN v TYPE bigint", BatchSize: 40, Workers: 1})
	byRange := get()
	var got []string
	for _, batches := range byRange {
		for _, b := range batches {
			got = append(got, fmt.Sprintf("%d %v %v", b.Rows, b.Last, b.Done))
		}
	}
	want := []string{"40 [40] false", "80 [80] false", "120 [120] false", "120 [120] true"}
	if len(byRange) != 1 || !slices.Equal(got, want) {
		t.Fatalf("batches %q (ranges %d), want %q", got, len(byRange), want)
	}
}

func keyList(t *testing.T, db *testDB, sql string) [][]string {
	t.Helper()
	rows, err := db.Pool.Query(context.Background(), sql)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var out [][]string
	for rows.Next() {
		var k []string
		if err := rows.Scan(&k); err != nil {
			t.Fatal(err)
		}
		out = append(out, k)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}
