// Package pgmeta reads what shadowctl needs to know about a table from the
// system catalogs: columns, the row key, indexes, constraints, foreign keys in
// and out, user triggers, grants, policies, dependent views, owned sequences
// and size. It only reads; it never changes the database.
package pgmeta

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/shadowctl/shadowctl/internal/pgsql"
)

// ErrNoTable means the named relation does not exist.
var ErrNoTable = errors.New("no such table")

// Column is one live column.
type Column struct {
	Num       int    `json:"num"`
	Name      string `json:"name"`
	Type      string `json:"type"` // format_type, e.g. numeric(12,2)
	NotNull   bool   `json:"not_null"`
	Default   string `json:"default,omitempty"`   // pg_get_expr of the default
	Generated bool   `json:"generated,omitempty"` // STORED generated column: never inserted
	Identity  string `json:"identity,omitempty"`  // 'a' (ALWAYS), 'd' (BY DEFAULT) or ""
	Collation string `json:"collation,omitempty"`
	TypeOID   uint32 `json:"type_oid"`
	TypeMod   int32  `json:"type_mod"`
}

// Index is one index of the table.
type Index struct {
	Name       string   `json:"name"`
	Def        string   `json:"def"` // pg_get_indexdef
	Primary    bool     `json:"primary,omitempty"`
	Unique     bool     `json:"unique,omitempty"`
	Valid      bool     `json:"valid"`
	Constraint string   `json:"constraint,omitempty"` // the constraint it backs, if any
	ConType    string   `json:"contype,omitempty"`    // p, u, x
	Columns    []string `json:"columns"`              // every column it uses (keys, INCLUDE, expressions, predicate)
	KeyColumns []string `json:"key_columns"`          // plain key columns in order ("" for an expression)
	Partial    bool     `json:"partial,omitempty"`
}

// Constraint is a foreign key or other table constraint with its definition.
type Constraint struct {
	Name      string `json:"name"`
	Type      string `json:"type"` // f, c, u, p, x
	Def       string `json:"def"`  // pg_get_constraintdef
	Table     string `json:"table,omitempty"`
	Schema    string `json:"schema,omitempty"`
	Validated bool   `json:"validated"`
	// Foreign keys only: the referencing and referenced columns and actions.
	Columns           []string `json:"columns,omitempty"`
	RefColumns        []string `json:"ref_columns,omitempty"`
	OnUpdate          string   `json:"on_update,omitempty"` // a, r, c, n, d
	OnDelete          string   `json:"on_delete,omitempty"`
	Match             string   `json:"match,omitempty"` // f, p, s
	Deferrable        bool     `json:"deferrable,omitempty"`
	InitiallyDeferred bool     `json:"initially_deferred,omitempty"`
}

// ForeignKeyDef renders a foreign key's definition referencing ref, from its
// parts (pg_get_constraintdef would name the table it references now).
func (c Constraint) ForeignKeyDef(ref string) string {
	action := map[string]string{"a": "NO ACTION", "r": "RESTRICT", "c": "CASCADE", "n": "SET NULL", "d": "SET DEFAULT"}
	q := func(cols []string) string {
		out := make([]string, len(cols))
		for i, c := range cols {
			out[i] = pgsql.Ident(c)
		}
		return strings.Join(out, ", ")
	}
	def := fmt.Sprintf("FOREIGN KEY (%s) REFERENCES %s (%s)", q(c.Columns), ref, q(c.RefColumns))
	if c.Match == "f" {
		def += " MATCH FULL"
	}
	def += " ON UPDATE " + action[c.OnUpdate] + " ON DELETE " + action[c.OnDelete]
	if c.Deferrable {
		def += " DEFERRABLE"
		if c.InitiallyDeferred {
			def += " INITIALLY DEFERRED"
		}
	}
	return def
}

// Trigger is a user trigger.
type Trigger struct {
	Name    string `json:"name"`
	Def     string `json:"def"`
	Enabled string `json:"enabled"` // O, D, R, A
}

// Sequence is a sequence owned by a column of the table.
type Sequence struct {
	Schema   string `json:"schema"`
	Name     string `json:"name"`
	Column   string `json:"column"`
	Identity bool   `json:"identity,omitempty"`
}

// Table is a snapshot of a table's definition.
type Table struct {
	OID    uint32 `json:"oid"`
	Schema string `json:"schema"`
	Name   string `json:"name"`
	// SQLName is schema.name as PostgreSQL's deparser writes it (quote_ident),
	// to find the table in pg_get_indexdef output.
	SQLName     string       `json:"sql_name"`
	Kind        string       `json:"kind"`        // relkind
	Persistence string       `json:"persistence"` // p, u, t
	Owner       string       `json:"owner"`
	Columns     []Column     `json:"columns"`
	Key         []string     `json:"key"`       // primary key, else the first unique index on NOT NULL columns
	KeyIndex    string       `json:"key_index"` // the index backing Key
	Indexes     []Index      `json:"indexes"`
	Constraints []Constraint `json:"constraints"` // outbound: checks, fks, uniques, excludes, pk
	InboundFKs  []Constraint `json:"inbound_fks"`
	Triggers    []Trigger    `json:"triggers"`
	Sequences   []Sequence   `json:"sequences"`
	RLS         bool         `json:"rls"`
	ForceRLS    bool         `json:"force_rls"`
	Policies    []string     `json:"policies"` // CREATE POLICY statements, table name left as {{TABLE}}
	Grants      []Grant      `json:"grants"`
	Comment     string       `json:"comment,omitempty"`
	Reloptions  []string     `json:"reloptions,omitempty"`
	// ReplicaIdentity is relreplident: d (default), n, f (full), i (index).
	ReplicaIdentity string `json:"replica_identity,omitempty"`
	// ReplicaIndex names the index of REPLICA IDENTITY USING INDEX.
	ReplicaIndex string   `json:"replica_index,omitempty"`
	Dependents   []string `json:"dependents,omitempty"` // views, rules and functions that depend on the table
	RowEstimate  int64    `json:"row_estimate"`
	TotalBytes   int64    `json:"total_bytes"`
}

// Grant is one privilege on the table, or on one of its columns.
type Grant struct {
	Grantee   string `json:"grantee"` // "PUBLIC" or a role name
	Privilege string `json:"privilege"`
	Grantable bool   `json:"grantable,omitempty"`
	Column    string `json:"column,omitempty"` // a column privilege (attacl); "" for the table
}

// Name returns the table's qualified name.
func (t *Table) QName() pgsql.QualifiedName {
	return pgsql.QualifiedName{Schema: t.Schema, Name: t.Name}
}

// Column returns the named column.
func (t *Table) Column(name string) (Column, bool) {
	for _, c := range t.Columns {
		if c.Name == name {
			return c, true
		}
	}
	return Column{}, false
}

// ColumnNames lists the live columns in order.
func (t *Table) ColumnNames() []string {
	out := make([]string, len(t.Columns))
	for i, c := range t.Columns {
		out[i] = c.Name
	}
	return out
}

// KeyTypes lists the types of the key columns.
func (t *Table) KeyTypes() []string {
	out := make([]string, len(t.Key))
	for i, k := range t.Key {
		c, _ := t.Column(k)
		out[i] = c.Type
	}
	return out
}

// HasUniqueIndexOn reports whether a valid, non-partial unique index has
// exactly these key columns (in any order).
func (t *Table) HasUniqueIndexOn(cols []string) bool {
	for _, ix := range t.Indexes {
		if ix.Unique && ix.Valid && !ix.Partial && len(ix.KeyColumns) == len(cols) && !slices.Contains(ix.KeyColumns, "") {
			a, b := slices.Clone(ix.KeyColumns), slices.Clone(cols)
			slices.Sort(a)
			slices.Sort(b)
			if slices.Equal(a, b) {
				return true
			}
		}
	}
	return false
}

// LeadingIndexOn reports whether some valid, non-partial index starts with cols.
func (t *Table) LeadingIndexOn(cols []string) bool {
	for _, ix := range t.Indexes {
		if ix.Valid && !ix.Partial && len(ix.KeyColumns) >= len(cols) && slices.Equal(ix.KeyColumns[:len(cols)], cols) {
			return true
		}
	}
	return false
}

// Load reads the definition of schema.name.
func Load(ctx context.Context, q pgsql.Querier, schema, name string) (*Table, error) {
	t := &Table{Schema: schema, Name: name}
	var comment *string
	var reloptions []string
	err := q.QueryRow(ctx, `
		SELECT c.oid, quote_ident(n.nspname) || '.' || quote_ident(c.relname), c.relkind::text, c.relpersistence::text, pg_get_userbyid(c.relowner),
		       c.relrowsecurity, c.relforcerowsecurity, obj_description(c.oid, 'pg_class'),
		       coalesce(c.reloptions, '{}'), c.relreplident::text,
		       coalesce((SELECT ic.relname FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid WHERE i.indrelid = c.oid AND i.indisreplident), ''),
		       greatest(c.reltuples, 0)::bigint,
		       CASE WHEN c.relkind IN ('r','m','p') THEN pg_total_relation_size(c.oid) ELSE 0 END
		  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
		 WHERE n.nspname = $1 AND c.relname = $2`, schema, name).
		Scan(&t.OID, &t.SQLName, &t.Kind, &t.Persistence, &t.Owner, &t.RLS, &t.ForceRLS, &comment, &reloptions, &t.ReplicaIdentity, &t.ReplicaIndex, &t.RowEstimate, &t.TotalBytes)
	if err != nil {
		if err.Error() == "no rows in result set" {
			return nil, fmt.Errorf("%s: %w", pgsql.QualifiedName{Schema: schema, Name: name}, ErrNoTable)
		}
		return nil, fmt.Errorf("load %s: %w", pgsql.QualifiedName{Schema: schema, Name: name}, err)
	}
	if comment != nil {
		t.Comment = *comment
	}
	t.Reloptions = reloptions
	if t.RowEstimate == 0 && t.Kind == "r" {
		// Never analysed (reltuples -1 → 0): estimate from the size.
		_ = q.QueryRow(ctx, `SELECT (pg_relation_size($1::oid) / 100)::bigint`, t.OID).Scan(&t.RowEstimate)
	}
	steps := []func(context.Context, pgsql.Querier) error{
		t.loadColumns, t.loadIndexes, t.loadConstraints, t.loadInbound, t.loadTriggers,
		t.loadSequences, t.loadPolicies, t.loadGrants, t.loadDependents,
	}
	for _, step := range steps {
		if err := step(ctx, q); err != nil {
			return nil, fmt.Errorf("load %s: %w", t.QName(), err)
		}
	}
	t.Key, t.KeyIndex = t.chooseKey()
	return t, nil
}

func (t *Table) loadColumns(ctx context.Context, q pgsql.Querier) error {
	out, err := collect(ctx, q, `
		SELECT a.attnum, a.attname, format_type(a.atttypid, a.atttypmod), a.atttypid, a.atttypmod, a.attnotnull,
		       coalesce(pg_get_expr(d.adbin, d.adrelid), ''), a.attgenerated = 's', a.attidentity::text,
		       coalesce(CASE WHEN a.attcollation <> t.typcollation THEN (SELECT quote_ident(nspname)||'.'||quote_ident(collname) FROM pg_collation co JOIN pg_namespace cn ON cn.oid = co.collnamespace WHERE co.oid = a.attcollation) END, '')
		  FROM pg_attribute a
		  JOIN pg_type t ON t.oid = a.atttypid
		  LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
		 WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
		 ORDER BY a.attnum`, t.OID, func(r pgx.CollectableRow) (Column, error) {
		var c Column
		err := r.Scan(&c.Num, &c.Name, &c.Type, &c.TypeOID, &c.TypeMod, &c.NotNull, &c.Default, &c.Generated, &c.Identity, &c.Collation)
		return c, err
	})
	t.Columns = out
	return err
}

func (t *Table) loadIndexes(ctx context.Context, q pgsql.Querier) error {
	out, err := collect(ctx, q, `
		SELECT ic.relname, pg_get_indexdef(i.indexrelid), i.indisprimary, i.indisunique, i.indisvalid AND i.indisready,
		       coalesce(con.conname, ''), coalesce(con.contype::text, ''), i.indpred IS NOT NULL,
		       ARRAY(SELECT coalesce(a.attname, '') FROM unnest(i.indkey[0:i.indnkeyatts-1]) WITH ORDINALITY k(attnum, ord)
		               LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
		              ORDER BY k.ord),
		       ARRAY(SELECT DISTINCT a.attname FROM pg_depend d JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
		              WHERE d.classid = 'pg_class'::regclass AND d.objid = i.indexrelid AND d.refobjid = i.indrelid AND d.refobjsubid > 0
		             UNION SELECT a.attname FROM pg_attribute a WHERE a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) AND a.attnum > 0)
		  FROM pg_index i
		  JOIN pg_class ic ON ic.oid = i.indexrelid
		  LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid AND con.contype IN ('p','u','x')
		 WHERE i.indrelid = $1
		 ORDER BY i.indisprimary DESC, ic.relname`, t.OID, func(r pgx.CollectableRow) (Index, error) {
		var ix Index
		err := r.Scan(&ix.Name, &ix.Def, &ix.Primary, &ix.Unique, &ix.Valid, &ix.Constraint, &ix.ConType, &ix.Partial, &ix.KeyColumns, &ix.Columns)
		slices.Sort(ix.Columns)
		return ix, err
	})
	t.Indexes = out
	return err
}

func (t *Table) loadConstraints(ctx context.Context, q pgsql.Querier) error {
	out, err := collect(ctx, q, `
		SELECT conname, contype::text, pg_get_constraintdef(oid), convalidated
		  FROM pg_constraint WHERE conrelid = $1 ORDER BY contype, conname`, t.OID, func(r pgx.CollectableRow) (Constraint, error) {
		var c Constraint
		err := r.Scan(&c.Name, &c.Type, &c.Def, &c.Validated)
		return c, err
	})
	t.Constraints = out
	return err
}

func (t *Table) loadInbound(ctx context.Context, q pgsql.Querier) error {
	out, err := collect(ctx, q, `
		SELECT con.conname, 'f', pg_get_constraintdef(con.oid), c.relname, n.nspname, con.convalidated,
		       ARRAY(SELECT a.attname FROM unnest(con.conkey) WITH ORDINALITY k(n, o) JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n ORDER BY k.o),
		       ARRAY(SELECT a.attname FROM unnest(con.confkey) WITH ORDINALITY k(n, o) JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.n ORDER BY k.o),
		       con.confupdtype::text, con.confdeltype::text, con.confmatchtype::text, con.condeferrable, con.condeferred
		  FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
		 WHERE con.confrelid = $1 AND con.contype = 'f' AND con.conrelid <> $1
		 ORDER BY n.nspname, c.relname, con.conname`, t.OID, func(r pgx.CollectableRow) (Constraint, error) {
		var c Constraint
		err := r.Scan(&c.Name, &c.Type, &c.Def, &c.Table, &c.Schema, &c.Validated, &c.Columns, &c.RefColumns,
			&c.OnUpdate, &c.OnDelete, &c.Match, &c.Deferrable, &c.InitiallyDeferred)
		return c, err
	})
	t.InboundFKs = out
	return err
}

func (t *Table) loadTriggers(ctx context.Context, q pgsql.Querier) error {
	out, err := collect(ctx, q, `
		SELECT tgname, pg_get_triggerdef(oid), tgenabled::text FROM pg_trigger
		 WHERE tgrelid = $1 AND NOT tgisinternal ORDER BY tgname`, t.OID, func(r pgx.CollectableRow) (Trigger, error) {
		var tr Trigger
		err := r.Scan(&tr.Name, &tr.Def, &tr.Enabled)
		return tr, err
	})
	t.Triggers = out
	return err
}

func (t *Table) loadSequences(ctx context.Context, q pgsql.Querier) error {
	out, err := collect(ctx, q, `
		SELECT sn.nspname, s.relname, a.attname, d.deptype = 'i'
		  FROM pg_depend d
		  JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
		  JOIN pg_namespace sn ON sn.oid = s.relnamespace
		  JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
		 WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
		   AND d.refobjid = $1 AND d.deptype IN ('a', 'i')
		 ORDER BY a.attnum`, t.OID, func(r pgx.CollectableRow) (Sequence, error) {
		var s Sequence
		err := r.Scan(&s.Schema, &s.Name, &s.Column, &s.Identity)
		return s, err
	})
	t.Sequences = out
	return err
}

func (t *Table) loadPolicies(ctx context.Context, q pgsql.Querier) error {
	out, err := collect(ctx, q, `
		SELECT format('CREATE POLICY %I ON {{TABLE}} AS %s FOR %s TO %s%s%s',
		         p.polname,
		         CASE WHEN p.polpermissive THEN 'PERMISSIVE' ELSE 'RESTRICTIVE' END,
		         CASE p.polcmd WHEN 'r' THEN 'SELECT' WHEN 'a' THEN 'INSERT' WHEN 'w' THEN 'UPDATE' WHEN 'd' THEN 'DELETE' ELSE 'ALL' END,
		         coalesce((SELECT string_agg(CASE WHEN r = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(r)) END, ', ') FROM unnest(p.polroles) r), 'PUBLIC'),
		         coalesce(' USING (' || pg_get_expr(p.polqual, p.polrelid) || ')', ''),
		         coalesce(' WITH CHECK (' || pg_get_expr(p.polwithcheck, p.polrelid) || ')', ''))
		  FROM pg_policy p WHERE p.polrelid = $1 ORDER BY p.polname`, t.OID, func(r pgx.CollectableRow) (string, error) {
		var s string
		err := r.Scan(&s)
		return s, err
	})
	t.Policies = out
	return err
}

func (t *Table) loadGrants(ctx context.Context, q pgsql.Querier) error {
	out, err := collect(ctx, q, `
		SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END, a.privilege_type, a.is_grantable, ''
		  FROM pg_class c, aclexplode(c.relacl) a
		 WHERE c.oid = $1 AND a.grantee <> c.relowner
		 UNION ALL
		SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END, a.privilege_type, a.is_grantable, att.attname
		  FROM pg_class c JOIN pg_attribute att ON att.attrelid = c.oid AND att.attnum > 0 AND NOT att.attisdropped, aclexplode(att.attacl) a
		 WHERE c.oid = $1 AND a.grantee <> c.relowner
		 ORDER BY 1, 2, 4`, t.OID, func(r pgx.CollectableRow) (Grant, error) {
		var g Grant
		err := r.Scan(&g.Grantee, &g.Privilege, &g.Grantable, &g.Column)
		return g, err
	})
	t.Grants = out
	return err
}

func (t *Table) loadDependents(ctx context.Context, q pgsql.Querier) error {
	out, err := collect(ctx, q, `
		SELECT DISTINCT pg_describe_object(d.classid, d.objid, 0) || coalesce(' (' ||
		       (SELECT ev_class::regclass::text FROM pg_rewrite r WHERE r.oid = d.objid AND d.classid = 'pg_rewrite'::regclass) || ')', '')
		  FROM pg_depend d
		 WHERE d.refclassid = 'pg_class'::regclass AND d.refobjid = $1
		   AND d.classid IN ('pg_rewrite'::regclass, 'pg_proc'::regclass)
		   AND d.deptype = 'n'
		   AND NOT EXISTS (SELECT 1 FROM pg_rewrite r WHERE r.oid = d.objid AND d.classid = 'pg_rewrite'::regclass AND r.ev_class = $1)
		 ORDER BY 1`, t.OID, func(r pgx.CollectableRow) (string, error) {
		var s string
		err := r.Scan(&s)
		return s, err
	})
	t.Dependents = out
	return err
}

// collect runs a catalog query for the table and scans each row.
func collect[T any](ctx context.Context, q pgsql.Querier, sql string, oid uint32, scan func(pgx.CollectableRow) (T, error)) ([]T, error) {
	rows, err := q.Query(ctx, sql, oid)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, scan)
}

// chooseKey picks the primary key, else the first valid non-partial unique
// index whose key columns are all plain and NOT NULL.
func (t *Table) chooseKey() ([]string, string) {
	for _, ix := range t.Indexes {
		if ix.Primary && ix.Valid {
			return ix.KeyColumns, ix.Name
		}
	}
	for _, ix := range t.Indexes {
		if !ix.Unique || !ix.Valid || ix.Partial || slices.Contains(ix.KeyColumns, "") {
			continue
		}
		ok := true
		for _, k := range ix.KeyColumns {
			if c, _ := t.Column(k); !c.NotNull {
				ok = false
			}
		}
		if ok {
			return ix.KeyColumns, ix.Name
		}
	}
	return nil, ""
}
