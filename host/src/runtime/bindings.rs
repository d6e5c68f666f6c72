//! The one `bindgen!` of the `plugin` world (from `wit/`), and nothing else.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "plugin",
    imports: { default: async | trappable },
    exports: { default: async },
});

pub use self::wasmhook::plugin::host::Level;
