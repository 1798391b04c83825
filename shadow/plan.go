package shadow

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/shadowctl/shadowctl/internal/pgmeta"
	"github.com/shadowctl/shadowctl/internal/pgsql"
	"github.com/shadowctl/shadowctl/internal/rowmap"
)

// Operator-facing refusals found while planning. Each is wrapped with the
// table, the object and the fix.
var (
	ErrNoSuchTable      = errors.New("no such table")
	ErrNotPlainTable    = errors.New("not a plain table")
	ErrNoKey            = errors.New("no usable row key")
	ErrGreenNoKey       = errors.New("green would have no usable row key")
	ErrKeyDropped       = errors.New("green would lose blue's key columns")
	ErrGreenExists      = errors.New("green table already exists")
	ErrNoReverseMapping = errors.New("a blue column cannot be derived from green")
	ErrBadMapping       = errors.New("bad column mapping")
	ErrDependents       = errors.New("other objects depend on the table")
	ErrStorageBudget    = errors.New("not enough storage budget")
	ErrUnsupported      = errors.New("unsupported table feature")
)

// Plan is everything derived from a request and blue's definition at
// preparing time. It is persisted with the migration so that every later
// phase, in any process, acts on the same decisions.
type Plan struct {
	Blue  *pgmeta.Table `json:"blue"`
	Green *pgmeta.Table `json:"green"` // as built, before secondary indexes
	// Forward maps blue rows to green rows; Reverse green rows to blue rows.
	Forward rowmap.Mapping `json:"forward"`
	Reverse rowmap.Mapping `json:"reverse"`
	// Deferred are green's indexes and constraints built after the bulk copy.
	DeferredIndexes     []pgmeta.Index      `json:"deferred_indexes"`
	DeferredConstraints []pgmeta.Constraint `json:"deferred_constraints"`
	Names               ObjectNames         `json:"names"`
	SearchPath          string              `json:"search_path"`
	// CopyGuard, in trigger sync with an integer first key column, guards
	// the copy's rows with key-bucket locks instead of row locks (nil: the
	// copy locks each row FOR KEY SHARE).
	CopyGuard *rowmap.KeyBuckets `json:"copy_guard,omitempty"`
}

// ObjectNames are the names of the objects a migration creates.
type ObjectNames struct {
	Base         string `json:"base"`
	ForwardFunc  string `json:"forward_func"`
	ForwardTrig  string `json:"forward_trigger"`
	TruncateTrig string `json:"truncate_trigger"`
	TruncateFunc string `json:"truncate_func"`
	ReverseFunc  string `json:"reverse_func"`
	ReverseTrig  string `json:"reverse_trigger"`
	ParkedBlue   string `json:"parked_blue"` // blue's name while green serves
}

// namesFor derives object names (each at most 63 bytes) from the migration id
// and the table name.
func namesFor(id, table string) ObjectNames {
	base := strings.ToLower(regexp.MustCompile(`[^A-Za-z0-9_]+`).ReplaceAllString(id, "_"))
	sum := sha256.Sum256([]byte(id))
	if len(base) > 24 || base != id {
		base = truncate(base, 16) + "_" + hex.EncodeToString(sum[:3])
	}
	return ObjectNames{
		Base:         base,
		ForwardFunc:  "fwd_" + base,
		ForwardTrig:  "shadowctl_fwd_" + base,
		TruncateTrig: "shadowctl_trunc_" + base,
		TruncateFunc: "trunc_" + base,
		ReverseFunc:  "rev_" + base,
		ReverseTrig:  "shadowctl_rev_" + base,
		ParkedBlue:   truncate(table, 63-len("__blue_")-6) + "__blue_" + hex.EncodeToString(sum[:3]),
	}
}

// truncate cuts s to at most n bytes without splitting a UTF-8 sequence.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && (s[n]&0xC0) == 0x80 {
		n--
	}
	return s[:n]
}

// splitTableName reads "schema.table" or "table" (quoted parts allowed);
// a bare name resolves through the search_path.
func splitTableName(ctx context.Context, q pgsql.Querier, name string) (pgsql.QualifiedName, error) {
	toks := tokens(name)
	var parts []string
	for i, t := range toks {
		if i%2 == 1 {
			if t.Word != "." || t.Quoted {
				return pgsql.QualifiedName{}, fmt.Errorf("%w: --table %q: write schema.table or table (quote names with double quotes)", ErrBadRequest, name)
			}
			continue
		}
		if !t.Quoted && !regexp.MustCompile(`^[a-z_][a-z0-9_$]*$`).MatchString(t.Word) {
			return pgsql.QualifiedName{}, fmt.Errorf("%w: --table %q: %q is not a plain identifier (quote it: \"%s\")", ErrBadRequest, name, t.Word, t.Word)
		}
		parts = append(parts, t.Word)
	}
	switch len(parts) {
	case 2:
		return pgsql.QualifiedName{Schema: parts[0], Name: parts[1]}, nil
	case 1:
		var schema *string
		err := q.QueryRow(ctx, `SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
			WHERE c.oid = to_regclass($1)`, pgx.Identifier{parts[0]}.Sanitize()).Scan(&schema)
		if errors.Is(err, pgx.ErrNoRows) || (err == nil && schema == nil) {
			return pgsql.QualifiedName{}, fmt.Errorf("table %s (searched the search_path): %w%s", pgsql.Ident(parts[0]), ErrNoSuchTable,
				quotingHint(ctx, q, pgsql.QualifiedName{Name: parts[0]}))
		}
		if err != nil {
			return pgsql.QualifiedName{}, fmt.Errorf("resolve --table %q: %w", name, err)
		}
		return pgsql.QualifiedName{Schema: *schema, Name: parts[0]}, nil
	}
	return pgsql.QualifiedName{}, fmt.Errorf("%w: --table %q: write schema.table or table", ErrBadRequest, name)
}

// quotingHint names tables that differ from a missing name only in letter
// case: unquoted names are folded to lower case, so "MyTable" must be quoted.
func quotingHint(ctx context.Context, q pgsql.Querier, name pgsql.QualifiedName) string {
	rows, err := q.Query(ctx, `SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
		WHERE lower(c.relname) = lower($2) AND ($1 = '' OR lower(n.nspname) = lower($1)) AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
		ORDER BY 1 LIMIT 3`, name.Schema, name.Name)
	if err != nil {
		return ""
	}
	names, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil || len(names) == 0 {
		return ""
	}
	return fmt.Sprintf("; did you mean %s? Unquoted names are folded to lower case: quote the name, e.g. --table '%s'", strings.Join(names, " or "), names[0])
}

// loadBlue reads blue and refuses what the tool cannot migrate.
func loadBlue(ctx context.Context, q pgsql.Querier, name pgsql.QualifiedName) (*pgmeta.Table, error) {
	blue, err := pgmeta.Load(ctx, q, name.Schema, name.Name)
	if errors.Is(err, pgmeta.ErrNoTable) {
		return nil, fmt.Errorf("table %s: %w (check the name and the --dsn database)%s", name, ErrNoSuchTable, quotingHint(ctx, q, name))
	}
	if err != nil {
		return nil, err
	}
	switch blue.Kind {
	case "r":
	case "p":
		return nil, fmt.Errorf("%s is a partitioned table: %w (partitioned tables are not supported yet; migrate each partition's table instead)", name, ErrNotPlainTable)
	case "v", "m":
		return nil, fmt.Errorf("%s is a view: %w (migrate the table it reads from)", name, ErrNotPlainTable)
	case "f":
		return nil, fmt.Errorf("%s is a foreign table: %w", name, ErrNotPlainTable)
	default:
		return nil, fmt.Errorf("%s has relkind %q: %w", name, blue.Kind, ErrNotPlainTable)
	}
	if blue.Persistence == "t" {
		return nil, fmt.Errorf("%s is a temporary table: %w", name, ErrNotPlainTable)
	}
	if len(blue.Key) == 0 {
		return nil, fmt.Errorf("%s has no primary key and no unique index on NOT NULL columns: %w (add one first, e.g. ALTER TABLE %s ADD PRIMARY KEY (...))", name, ErrNoKey, name)
	}
	var inherits bool
	if err := q.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_inherits WHERE inhrelid = $1 OR inhparent = $1)`, blue.OID).Scan(&inherits); err != nil {
		return nil, err
	}
	if inherits {
		return nil, fmt.Errorf("%s takes part in table inheritance or partitioning: %w", name, ErrNotPlainTable)
	}
	if len(blue.Dependents) > 0 {
		return nil, fmt.Errorf("%s: %w: %s — they bind to the table itself and would keep reading blue after the swap; drop them and re-create them after finalize", name, ErrDependents, strings.Join(blue.Dependents, "; "))
	}
	for _, c := range blue.Constraints {
		if c.Type == "x" {
			return nil, fmt.Errorf("%s has exclusion constraint %s: %w (exclusion constraints are not supported yet)", name, pgsql.Ident(c.Name), ErrUnsupported)
		}
	}
	return blue, nil
}

// buildMappings derives the forward and reverse mappings and checks that every
// blue column can be derived back from green.
func buildMappings(req Request, blue, green *pgmeta.Table, using map[string]string) (fwd, rev rowmap.Mapping, err error) {
	for col := range req.Map {
		c, ok := green.Column(col)
		if !ok {
			return fwd, rev, fmt.Errorf("%w: --map %s: green has no column %s", ErrBadMapping, col, pgsql.Ident(col))
		}
		if c.Generated {
			return fwd, rev, fmt.Errorf("%w: --map %s: it is a generated column of green, computed by PostgreSQL", ErrBadMapping, col)
		}
	}
	for col := range req.ReverseMap {
		c, ok := blue.Column(col)
		if !ok {
			return fwd, rev, fmt.Errorf("%w: --reverse-map %s: blue has no column %s", ErrBadMapping, col, pgsql.Ident(col))
		}
		if c.Generated {
			return fwd, rev, fmt.Errorf("%w: --reverse-map %s: it is a generated column of blue", ErrBadMapping, col)
		}
	}
	for _, k := range blue.Key {
		if _, ok := green.Column(k); !ok {
			return fwd, rev, fmt.Errorf("%s: %w: green must keep the key column %s (it matches rows between blue and green)", blue.QName(), ErrKeyDropped, pgsql.Ident(k))
		}
	}
	fwd = rowmap.Mapping{
		Source: blue.QName(), Target: green.QName(), Alias: blue.Name,
		SourceKey: blue.Key, SourceKeyTypes: blue.KeyTypes(), ConflictKey: green.Key,
	}
	for _, gc := range green.Columns {
		if gc.Generated {
			continue
		}
		expr, ok := req.Map[gc.Name]
		source := ""
		if !ok {
			if u, has := using[gc.Name]; has && u != "" {
				expr, ok = "("+u+")", true
			} else if bc, has := blue.Column(gc.Name); has {
				expr, ok, source = pgsql.Ident(blue.Name)+"."+pgsql.Ident(bc.Name), true, bc.Name
			}
		}
		if ok {
			fwd.Columns = append(fwd.Columns, rowmap.Column{Target: gc.Name, TargetType: gc.Type, Expr: expr, Source: source})
		}
	}
	for _, k := range blue.Key {
		for _, c := range fwd.Columns {
			if c.Target == k {
				fwd.Match = append(fwd.Match, c)
			}
		}
	}
	if len(fwd.Match) != len(blue.Key) {
		return fwd, rev, fmt.Errorf("%s: %w: green's key columns must be filled from blue", blue.QName(), ErrBadMapping)
	}

	rev = rowmap.Mapping{
		Source: green.QName(), Target: blue.QName(), Alias: blue.Name,
		SourceKey: green.Key, SourceKeyTypes: green.KeyTypes(), ConflictKey: blue.Key,
	}
	for _, bc := range blue.Columns {
		if bc.Generated {
			continue
		}
		expr, ok := req.ReverseMap[bc.Name]
		source := ""
		if !ok {
			if gc, has := green.Column(bc.Name); has {
				expr, ok, source = pgsql.Ident(blue.Name)+"."+pgsql.Ident(gc.Name), true, gc.Name
				if gc.Type != bc.Type {
					expr = fmt.Sprintf("CAST(%s AS %s)", expr, bc.Type)
				}
			}
		}
		if !ok {
			return fwd, rev, fmt.Errorf("%s: %w: blue column %s has no counterpart in green; give --reverse-map %s=<SQL over green's columns> (or =NULL to lose it on rollback) so that blue stays current after the cutover",
				blue.QName(), ErrNoReverseMapping, pgsql.Ident(bc.Name), bc.Name)
		}
		rev.Columns = append(rev.Columns, rowmap.Column{Target: bc.Name, TargetType: bc.Type, Expr: expr, Source: source})
		if bc.Identity == "a" {
			// Blue's GENERATED ALWAYS identity column receives green's values.
			rev.OverridingSystemValue = true
		}
	}
	for _, k := range blue.Key {
		for _, c := range rev.Columns {
			if c.Target == k {
				rev.Match = append(rev.Match, c)
			}
		}
	}
	return fwd, rev, nil
}

// secondary reports whether an index of green is built after the copy: every
// index but the one backing green's key.
func secondary(green *pgmeta.Table, ix pgmeta.Index) bool {
	return ix.Name != green.KeyIndex
}

// rewriteIndexDef re-targets pg_get_indexdef output at another table,
// optionally CONCURRENTLY.
func rewriteIndexDef(def string, from *pgmeta.Table, to pgsql.QualifiedName, name string, concurrently bool) (string, error) {
	on := " ON " + from.SQLName + " USING "
	onOnly := " ON ONLY " + from.SQLName + " USING "
	i := strings.Index(def, on)
	n := len(on)
	if i < 0 {
		i, n = strings.Index(def, onOnly), len(onOnly)
	}
	if i < 0 {
		return "", fmt.Errorf("cannot re-target index definition %q", def)
	}
	unique := ""
	if strings.HasPrefix(def, "CREATE UNIQUE INDEX") {
		unique = "UNIQUE "
	}
	how := ""
	if concurrently {
		how = "CONCURRENTLY IF NOT EXISTS "
	}
	return fmt.Sprintf("CREATE %sINDEX %s%s ON %s USING %s", unique, how, pgsql.Ident(name), to.Quoted(), def[i+n:]), nil
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}
