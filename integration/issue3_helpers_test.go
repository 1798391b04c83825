package integration

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/shadowctl/shadowctl/internal/pgsql"
)

// The helpers of the issue-3 acceptance tests: a full schema fingerprint,
// checks for leftover tool objects, and condition waits (never sleeps as
// synchronisation: each wait polls the condition itself, under a deadline).

// dbFingerprint lists, one line per object, the definition of everything a
// migration could create or change in the database: schemas, relations (kind,
// owner, grants, options, RLS, comment), columns (type, NOT NULL, default,
// identity, generated, collation, grants), view definitions, indexes,
// constraints (with their validation state), triggers (with their enabled
// state), functions (signature, body, owner, grants), sequences (parameters
// and owning column), policies, rules, extensions, publications and
// replication slots.
//
// The catalog schema's own tables, indexes and constraints are left out (they
// are the catalog, which stays); functions are listed in every schema, the
// catalog's included, because the sync functions are created there: a
// leftover one must show.
func dbFingerprint(t testing.TB, db *testDB, catalogSchema string) string {
	t.Helper()
	const userNsp = `n.nspname !~ '^pg_' AND n.nspname <> 'information_schema'`
	q := `
SELECT coalesce(string_agg(x, E'\n' ORDER BY x), '') FROM (
  SELECT format('nsp %I owner=%s acl=%s comment=%s', n.nspname, pg_get_userbyid(n.nspowner), n.nspacl, obj_description(n.oid, 'pg_namespace')) AS x
    FROM pg_namespace n WHERE ` + userNsp + ` AND n.nspname <> $1
  UNION ALL
  SELECT format('rel %I.%I kind=%s persist=%s owner=%s acl=%s opts=%s rls=%s/%s replident=%s comment=%s',
         n.nspname, c.relname, c.relkind, c.relpersistence, pg_get_userbyid(c.relowner), c.relacl, c.reloptions,
         c.relrowsecurity, c.relforcerowsecurity, c.relreplident, obj_description(c.oid, 'pg_class'))
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE ` + userNsp + ` AND n.nspname <> $1
  UNION ALL
  SELECT format('col %I.%I #%s %I %s notnull=%s default=%s identity=%s generated=%s collation=%s acl=%s comment=%s',
         n.nspname, c.relname, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
         pg_get_expr(d.adbin, d.adrelid), a.attidentity, a.attgenerated, a.attcollation::regcollation, a.attacl,
         col_description(c.oid, a.attnum))
    FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
   WHERE ` + userNsp + ` AND n.nspname <> $1 AND a.attnum > 0 AND NOT a.attisdropped
  UNION ALL
  SELECT format('view %I.%I %s', n.nspname, c.relname, pg_get_viewdef(c.oid))
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE ` + userNsp + ` AND n.nspname <> $1 AND c.relkind IN ('v', 'm')
  UNION ALL
  SELECT format('idx %s valid=%s ready=%s', pg_get_indexdef(i.indexrelid), i.indisvalid, i.indisready)
    FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace
   WHERE ` + userNsp + ` AND n.nspname <> $1
  UNION ALL
  SELECT format('con %I %s %s validated=%s deferrable=%s/%s', co.conname,
         CASE WHEN co.conrelid <> 0 THEN format('%I.%I', n.nspname, c.relname) ELSE co.contypid::regtype::text END,
         pg_get_constraintdef(co.oid), co.convalidated, co.condeferrable, co.condeferred)
    FROM pg_constraint co JOIN pg_namespace n ON n.oid = co.connamespace LEFT JOIN pg_class c ON c.oid = co.conrelid
   WHERE ` + userNsp + ` AND n.nspname <> $1
  UNION ALL
  SELECT format('trg %I.%I %s enabled=%s', n.nspname, c.relname, pg_get_triggerdef(tg.oid), tg.tgenabled)
    FROM pg_trigger tg JOIN pg_class c ON c.oid = tg.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
   WHERE NOT tg.tgisinternal AND n.nspname <> $1
  UNION ALL
  SELECT format('fn %I.%s(%s) kind=%s owner=%s acl=%s secdef=%s config=%s body=%s', n.nspname, quote_ident(p.proname),
         pg_get_function_identity_arguments(p.oid), p.prokind, pg_get_userbyid(p.proowner), p.proacl, p.prosecdef,
         p.proconfig, md5(p.prosrc))
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE ` + userNsp + `
  UNION ALL
  SELECT format('seq %I.%I type=%s start=%s inc=%s min=%s max=%s cache=%s cycle=%s', n.nspname, c.relname,
         s.seqtypid::regtype, s.seqstart, s.seqincrement, s.seqmin, s.seqmax, s.seqcache, s.seqcycle)
    FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid JOIN pg_namespace n ON n.oid = c.relnamespace
   WHERE n.nspname <> $1
  UNION ALL
  SELECT format('owned %s by %s.%I (%s)', d.objid::regclass, d.refobjid::regclass, a.attname, d.deptype)
    FROM pg_depend d JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
    JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
   WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
     AND s.relnamespace <> coalesce(to_regnamespace($1), 0)
  UNION ALL
  SELECT format('policy %s %I %s %s using=%s check=%s', p.polrelid::regclass, p.polname, p.polcmd, p.polpermissive,
         pg_get_expr(p.polqual, p.polrelid), pg_get_expr(p.polwithcheck, p.polrelid))
    FROM pg_policy p
  UNION ALL
  SELECT format('rule %s %I %s', r.ev_class::regclass, r.rulename, pg_get_ruledef(r.oid))
    FROM pg_rewrite r JOIN pg_class c ON c.oid = r.ev_class JOIN pg_namespace n ON n.oid = c.relnamespace
   WHERE ` + userNsp + ` AND n.nspname <> $1 AND r.rulename <> '_RETURN'
  UNION ALL SELECT format('ext %I %s', extname, extversion) FROM pg_extension
  UNION ALL SELECT format('pub %I', pubname) FROM pg_publication
  UNION ALL SELECT format('slot %I', slot_name) FROM pg_replication_slots WHERE database = current_database()
  UNION ALL SELECT format('evt %I', evtname) FROM pg_event_trigger
) s`
	var fp string
	if err := db.Pool.QueryRow(context.Background(), q, catalogSchema).Scan(&fp); err != nil {
		t.Fatalf("fingerprint: %v", err)
	}
	return fp
}

// assertSameSchema fails with the lines that differ between two fingerprints.
func assertSameSchema(t testing.TB, what, before, after string) {
	t.Helper()
	if before == after {
		return
	}
	b, a := map[string]bool{}, map[string]bool{}
	for _, l := range strings.Split(before, "\n") {
		b[l] = true
	}
	for _, l := range strings.Split(after, "\n") {
		a[l] = true
	}
	var diff []string
	for l := range b {
		if !a[l] {
			diff = append(diff, "- "+l)
		}
	}
	for l := range a {
		if !b[l] {
			diff = append(diff, "+ "+l)
		}
	}
	t.Fatalf("%s: the schema changed (- before, + after):\n%s", what, strings.Join(diff, "\n"))
}

// assertNoToolObjects fails when anything the tool creates outlives a
// migration: sync triggers or functions, a green schema or table, a parked
// blue, publications or slots.
func assertNoToolObjects(t testing.TB, db *testDB, greenSchema string) {
	t.Helper()
	var leftovers []string
	rows, err := db.Pool.Query(context.Background(), `
		SELECT 'trigger ' || tgname || ' on ' || tgrelid::regclass FROM pg_trigger WHERE NOT tgisinternal AND tgname LIKE 'shadowctl%'
		UNION ALL SELECT 'function ' || p.oid::regprocedure FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'shadowctl'
		UNION ALL SELECT 'schema ' || nspname FROM pg_namespace WHERE nspname = $1
		UNION ALL SELECT 'relation ' || oid::regclass FROM pg_class WHERE relname LIKE '%\_\_blue\_%'
		UNION ALL SELECT 'publication ' || pubname FROM pg_publication
		UNION ALL SELECT 'slot ' || slot_name FROM pg_replication_slots WHERE database = current_database()`, greenSchema)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			t.Fatal(err)
		}
		leftovers = append(leftovers, s)
	}
	if rows.Err() != nil {
		t.Fatal(rows.Err())
	}
	if len(leftovers) > 0 {
		t.Fatalf("tool objects left behind: %s", strings.Join(leftovers, "; "))
	}
}

// waitFor polls cond until it holds, failing the test after timeout.
func waitFor(t testing.TB, what string, timeout time.Duration, cond func() (bool, error)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, err := cond()
		if err != nil {
			t.Fatalf("waiting for %s: %v", what, err)
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(2 * time.Millisecond) // poll interval, not synchronisation
	}
}

// waitLockWait waits until backend pid waits for a heavyweight lock, and
// returns the pids blocking it.
func waitLockWait(t testing.TB, db *testDB, what string, pid int32) []int32 {
	t.Helper()
	var blockers []int32
	waitFor(t, what+" to wait for a lock", 20*time.Second, func() (bool, error) {
		var waiting bool
		err := db.Pool.QueryRow(context.Background(), `SELECT coalesce(wait_event_type = 'Lock', false), pg_blocking_pids(pid)
			FROM pg_stat_activity WHERE pid = $1`, pid).Scan(&waiting, &blockers)
		return waiting, err
	})
	return blockers
}

// holdsLockOn reports whether backend pid holds any lock on relation rel.
func holdsLockOn(t testing.TB, db *testDB, pid int32, rel string) bool {
	t.Helper()
	return scalar[bool](db, `SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = $1 AND relation = to_regclass($2) AND granted)`, pid, rel)
}

// qi quotes an identifier for the SQL the tests write themselves.
func qi(name string) string { return pgsql.Ident(name) }

// qn quotes a schema-qualified name.
func qn(schema, name string) string { return pgsql.QualifiedName{Schema: schema, Name: name}.Quoted() }

func contains32(xs []int32, x int32) bool {
	for _, v := range xs {
		if v == x {
			return true
		}
	}
	return false
}

var _ = fmt.Sprintf
