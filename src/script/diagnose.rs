//! Script errors a person can act on at once: the offending source line with a caret under the
//! column, and calls to functions that exist nowhere, found when the script is compiled rather
//! than by the first request that reaches them.

use rhai::{AST, ASTNode, Engine, Expr, Position, Stmt};
use std::collections::HashSet;

/// Functions the evaluator handles itself: no module registers them, every script has them.
const KEYWORD_FUNCTIONS: [&str; 9] = [
    "print",
    "debug",
    "type_of",
    "Fn",
    "call",
    "curry",
    "is_shared",
    "is_def_var",
    "is_def_fn",
];

/// `message` followed by the source line at `position` and a caret under its column, in the
/// layout compilers use. Without a line (or past the end of the file) `message` as it is.
pub fn with_excerpt(message: String, source: &str, position: Position) -> String {
    let Some(line) = position.line() else {
        return message;
    };
    let Some(text) = source.lines().nth(line.saturating_sub(1)) else {
        return message;
    };
    let number = line.to_string();
    let gutter = " ".repeat(number.len());
    let mut excerpt = format!("{message}\n{gutter} |\n{number} | {text}");
    if let Some(column) = position.position() {
        // Tabs stay tabs so the caret lines up however the terminal renders them.
        let pad: String = text
            .chars()
            .take(column.saturating_sub(1))
            .map(|c| if c == '\t' { '\t' } else { ' ' })
            .collect();
        excerpt.push_str(&format!("\n{gutter} | {pad}^"));
    }
    excerpt
}

/// A call to a function the script does not define and the engine does not register.
pub struct UnknownCall {
    pub name: String,
    pub arguments: usize,
    pub position: Position,
}

impl UnknownCall {
    pub fn message(&self) -> String {
        let plural = if self.arguments == 1 { "" } else { "s" };
        format!(
            "unknown function {}() called with {} argument{plural}: neither defined in the script nor registered by command-trigger",
            self.name, self.arguments
        )
    }
}

/// Every plain call `name(args)` in `ast` (function bodies included) that matches no function
/// by name and argument count. Method calls (`x.name()`) are left alone: a map property can
/// hold a function pointer, so they cannot be judged without running the script. So are calls
/// through a variable of the same name. Functions `also` defines count as known.
pub fn unknown_calls(engine: &Engine, ast: &AST, also: Option<&AST>) -> Vec<UnknownCall> {
    let mut known: HashSet<(String, usize)> = engine
        .collect_fn_metadata(
            None,
            |info| Some((info.metadata.name.to_string(), info.metadata.num_params)),
            true,
        )
        .into_iter()
        .collect();
    let mut variables: HashSet<String> = HashSet::new();
    for function in ast
        .iter_functions()
        .chain(also.into_iter().flat_map(AST::iter_functions))
    {
        known.insert((function.name.to_owned(), function.params.len()));
        variables.extend(function.params.iter().map(|p| p.to_string()));
    }
    let mut calls = Vec::new();
    ast.walk(&mut |path: &[ASTNode]| {
        match path.last() {
            Some(ASTNode::Expr(Expr::FnCall(call, position)))
            | Some(ASTNode::Stmt(Stmt::FnCall(call, position)))
                if !call.is_operator_call() =>
            {
                calls.push((call.name.to_string(), call.args.len(), *position));
            }
            Some(ASTNode::Expr(Expr::Variable(variable, ..))) => {
                variables.insert(variable.1.to_string());
            }
            Some(ASTNode::Stmt(Stmt::Var(declared, ..))) => {
                variables.insert(declared.0.name.to_string());
            }
            Some(ASTNode::Stmt(Stmt::For(each, ..))) => {
                variables.insert(each.0.name.to_string());
                if let Some(counter) = &each.1 {
                    variables.insert(counter.name.to_string());
                }
            }
            _ => {}
        }
        true
    });
    calls
        .into_iter()
        .filter(|(name, arguments, _)| {
            is_identifier(name)
                && !KEYWORD_FUNCTIONS.contains(&name.as_str())
                && !variables.contains(name)
                && !known.contains(&(name.clone(), *arguments))
        })
        .map(|(name, arguments, position)| UnknownCall {
            name,
            arguments,
            position,
        })
        .collect()
}

/// Operators are calls too in the AST (`!x`, `a + b`); only named functions are judged.
fn is_identifier(name: &str) -> bool {
    name.chars()
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_caret_sits_under_the_column_tabs_included() {
        let source = "fn handle(req) {\n\tlet x = ;\n}\n";
        let shown = with_excerpt("f:2:10: oops".into(), source, Position::new(2, 10));
        assert_eq!(shown, "f:2:10: oops\n  |\n2 | \tlet x = ;\n  | \t        ^");
        let past_the_end = with_excerpt("f: oops".into(), source, Position::new(9, 1));
        assert_eq!(past_the_end, "f: oops");
    }

    #[test]
    fn only_calls_to_functions_that_exist_nowhere_are_reported() {
        let mut engine = Engine::new_raw();
        engine.register_fn("known", |x: i64| x);
        let script = "fn handle(req) {\n  let f = |x| x;\n  known(1) + mine(2) + f(3) + \
                      !true.to_string().len() + missing(4) + known(1, 2)\n}\nfn mine(x) { x }\n";
        let ast = engine.compile(script).expect("compiles");
        let found: Vec<(String, usize)> = unknown_calls(&engine, &ast, None)
            .into_iter()
            .map(|c| (c.name, c.arguments))
            .collect();
        assert_eq!(found, [("missing".into(), 1), ("known".into(), 2)]);
    }
}
