//! Which fields of `req` the handler can read, found once per compile: building the whole map
//! (eleven fields, the HTTP ones besides, each an allocation or two) was a third of the
//! instructions of a keep-alive request whose handler reads one field or none.

use rhai::{AST, ASTNode, Expr, Module, Stmt};
use std::collections::BTreeSet;

/// The fields of `req` a handler reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ReqUse {
    /// The map as a whole may be seen: passed on, returned, iterated, indexed by a string, or
    /// reachable through `eval` (disabled in the server's engine, counted all the same). Every
    /// field is built.
    All,
    /// Only ever `req.name` (or `req.name...`): these names, and no others, are built.
    Fields(BTreeSet<String>),
}

impl ReqUse {
    pub(crate) fn wants(&self, field: &str) -> bool {
        match self {
            ReqUse::All => true,
            ReqUse::Fields(names) => names.contains(field),
        }
    }
}

/// Looks at every mention of `handle`'s parameter in its body. Other functions cannot see it
/// (a Rhai function has no access to its caller's variables, and closures are compiled out),
/// except through an argument, which is a mention that is no property access.
pub(crate) fn req_use(ast: &AST) -> ReqUse {
    let Some(handle) = ast
        .iter_fn_def()
        .find(|f| f.name == "handle" && f.params.len() == 1)
    else {
        return ReqUse::All;
    };
    let param = handle.params[0].clone();
    // `handle` alone, to walk (its body's type is not exported by Rhai).
    let mut lib = Module::new();
    lib.set_script_fn(handle.clone());
    let handle_only = AST::new(Vec::new(), lib);
    let mut fields = BTreeSet::new();
    let mut all = false;
    handle_only.walk(&mut |path: &[ASTNode]| {
        match path.last() {
            Some(ASTNode::Expr(Expr::FnCall(call, ..)) | ASTNode::Stmt(Stmt::FnCall(call, ..)))
                if call.name == "eval" =>
            {
                all = true
            }
            Some(ASTNode::Expr(variable)) if is_variable(variable, &param) => {
                match property_read(path, variable) {
                    Some(field) => {
                        fields.insert(field.to_owned());
                    }
                    None => all = true,
                }
            }
            _ => {}
        }
        !all
    });
    if all {
        ReqUse::All
    } else {
        ReqUse::Fields(fields)
    }
}

fn is_variable(expr: &Expr, name: &str) -> bool {
    matches!(expr, Expr::Variable(variable, ..) if variable.1 == name)
}

/// The property read when `variable` is the left side of `variable.property...`.
fn property_read<'a>(path: &[ASTNode<'a>], variable: &Expr) -> Option<&'a str> {
    let parent = path.len().checked_sub(2).and_then(|i| path.get(i))?;
    let ASTNode::Expr(Expr::Dot(dot, ..)) = parent else {
        return None;
    };
    if !std::ptr::eq(&dot.lhs, variable) {
        return None;
    }
    let first = match &dot.rhs {
        Expr::Dot(chain, ..) | Expr::Index(chain, ..) => &chain.lhs,
        other => other,
    };
    match first {
        Expr::Property(property, ..) => Some(property.2.as_str()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn use_of(script: &str) -> ReqUse {
        let engine = rhai::Engine::new_raw();
        match engine.compile(script) {
            Ok(ast) => req_use(&ast),
            Err(e) => panic!("{script}: {e}"),
        }
    }

    fn fields(names: &[&str]) -> ReqUse {
        ReqUse::Fields(names.iter().map(|n| n.to_string()).collect())
    }

    #[test]
    fn property_reads_name_their_fields() {
        assert_eq!(use_of(r#"fn handle(req) { "ok\n" }"#), fields(&[]));
        assert_eq!(use_of("fn handle(r) { r.payload }"), fields(&["payload"]));
        assert_eq!(
            use_of(
                "fn handle(req) { if req.args[0] == \"x\" { req.tls?.client } else { req.peer.len() } }"
            ),
            fields(&["args", "peer", "tls"])
        );
        assert_eq!(
            use_of("fn handle(req) { req.payload = \"x\"; req.payload }"),
            fields(&["payload"])
        );
    }

    #[test]
    fn any_other_mention_builds_the_whole_map() {
        for script in [
            "fn handle(req) { req }",
            "fn handle(req) { f(req) } fn f(x) { x.payload }",
            "fn handle(req) { req.keys() }",
            r#"fn handle(req) { req["payload"] }"#,
            "fn handle(req) { let r = req; r.payload }",
            "fn handle(req) { for k in req.keys() { } }",
            r#"fn handle(req) { `${req}` }"#,
            r#"fn handle(req) { eval("req.peer") }"#,
            r#"fn handle(req) { eval("req.peer"); "ok" }"#,
            "fn handle(req) { req.payload + req }",
        ] {
            assert_eq!(use_of(script), ReqUse::All, "{script}");
        }
    }

    #[test]
    fn other_functions_do_not_count() {
        assert_eq!(
            use_of("fn handle(req) { req.id } fn on_tick(req) { req }"),
            fields(&["id"])
        );
    }
}
