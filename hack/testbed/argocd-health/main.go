// argocd-health runs an Argo CD health check the way Argo CD does: with
// gopher-lua (the Lua 5.1 VM Argo CD embeds), the live object as the global
// table `obj`, the script's returned table read for `status` and `message`.
// It takes a directory in Argo CD's resource_customizations layout
// (<group>/<kind>/health.lua, health_test.yaml, testdata/) and runs every
// test of health_test.yaml, printing one line per test:
//
//	<inputPath>\t<status>\t<message>\t<ok|MISMATCH>
//
// and exits 1 if any result differs from what health_test.yaml expects.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	lua "github.com/yuin/gopher-lua"
	"sigs.k8s.io/yaml"
)

type healthTest struct {
	Tests []struct {
		HealthStatus struct {
			Status  string `json:"status"`
			Message string `json:"message"`
		} `json:"healthStatus"`
		InputPath string `json:"inputPath"`
	} `json:"tests"`
}

// toLua converts a JSON value as Argo CD's decodeValue does: objects and
// arrays become tables (arrays 1-based), null is nil.
func toLua(l *lua.LState, v interface{}) lua.LValue {
	switch v := v.(type) {
	case map[string]interface{}:
		t := l.NewTable()
		for k, x := range v {
			t.RawSetString(k, toLua(l, x))
		}
		return t
	case []interface{}:
		t := l.NewTable()
		for i, x := range v {
			t.RawSetInt(i+1, toLua(l, x))
		}
		return t
	case string:
		return lua.LString(v)
	case float64:
		return lua.LNumber(v)
	case json.Number:
		f, _ := v.Float64()
		return lua.LNumber(f)
	case bool:
		return lua.LBool(v)
	default:
		return lua.LNil
	}
}

func run(script string, object map[string]interface{}) (string, string, error) {
	l := lua.NewState(lua.Options{SkipOpenLibs: false})
	defer l.Close()
	l.SetGlobal("obj", toLua(l, object))
	if err := l.DoString(script); err != nil {
		return "", "", err
	}
	ret, ok := l.Get(-1).(*lua.LTable)
	if !ok {
		return "", "", fmt.Errorf("the script returned no table")
	}
	return lua.LVAsString(ret.RawGetString("status")), lua.LVAsString(ret.RawGetString("message")), nil
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: argocd-health <resource_customizations/<group>/<kind>>")
		os.Exit(2)
	}
	dir := os.Args[1]
	script, err := os.ReadFile(filepath.Join(dir, "health.lua"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	raw, err := os.ReadFile(filepath.Join(dir, "health_test.yaml"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	var tests healthTest
	if err := yaml.Unmarshal(raw, &tests); err != nil {
		fmt.Fprintln(os.Stderr, "health_test.yaml:", err)
		os.Exit(2)
	}
	failed := false
	for _, t := range tests.Tests {
		input, err := os.ReadFile(filepath.Join(dir, t.InputPath))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		var object map[string]interface{}
		if err := yaml.Unmarshal(input, &object); err != nil {
			fmt.Fprintln(os.Stderr, t.InputPath, err)
			os.Exit(2)
		}
		status, message, err := run(string(script), object)
		if err != nil {
			fmt.Fprintln(os.Stderr, t.InputPath, err)
			os.Exit(1)
		}
		verdict := "ok"
		if status != t.HealthStatus.Status || message != t.HealthStatus.Message {
			verdict = "MISMATCH"
			failed = true
		}
		fmt.Printf("%s\t%s\t%s\t%s\n", t.InputPath, status, message, verdict)
	}
	if failed {
		os.Exit(1)
	}
}
